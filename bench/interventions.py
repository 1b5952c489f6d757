"""What do the interventions cost? Ablation grid and sweeps against one forward, on the default model.

    python bench/interventions.py                         # 256 tokens, 5 repeats, torch's own thread count
    python bench/interventions.py --tokens 1024 --repeats 9 --threads 2

On the shipped default model (``moe_viz.load_model()``, offline from assets/) and one prompt of
exactly ``--tokens`` token ids (a paragraph's ids repeated and cut), timed side by side in one run:
one warm-up call each, then ``--repeats`` rounds, each round calling every case once in turn
(round-robin, so machine noise hits all alike); the median ms of each case:

* ``forward``: ``run_prompt(model, ids, None)``: one native forward, traced (the unit);
* ``importance_reroute`` / ``importance_zero``: ``importance.expert_importance`` (the ablation
  grid: a native run plus one batched forward of E rows per MoE layer);
* ``capacity_sweep``: ``sweeps.capacity_sweep`` (the default 9 factors 0.25..4: a native run plus
  one batched forward of 9 rows);
* ``k_sweep``: ``sweeps.k_sweep`` (k = 1..E: a native run plus one batched forward of E rows);
* ``capacity_naive``: the capacity sweep done naively, one ``run_prompt(model, ids, Capacity(f))``
  per factor of ``sweeps.DEFAULT_FACTORS``, for contrast (the traces only: unlike
  ``capacity_sweep`` it computes no KL, flips or drop table).

Prints each as ms and as a ratio to ``forward``. Goal: the whole capacity sweep <= 3x one forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_viz, installed or not
import moe_viz  # noqa: E402
from moe_viz import importance, sweeps  # noqa: E402

GOAL_RATIO = 3.0
PARAGRAPH = (
    "A mixture-of-experts layer replaces one feed-forward block with several experts and a router. "
    "For every token the router scores each expert, keeps the best two, and mixes their outputs by "
    "the router's weights. When a capacity factor is set, each expert takes at most a fixed number of "
    "tokens per sequence; the overflow is dropped and passes through the residual stream unchanged.\n"
    "def route(scores, k=2):\n    return sorted(range(len(scores)), key=scores.__getitem__)[-k:]\n"
)


def token_ids(model: moe_viz.MoEModel, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` token ids: the paragraph's ids, repeated and truncated."""
    base = model.tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"][0].tolist()
    if not base:
        raise ValueError("the paragraph tokenises to nothing")
    return (base * (n_tokens // len(base) + 1))[:n_tokens]


def cases(model: moe_viz.MoEModel, ids: list[int]) -> dict[str, Callable[[], object]]:
    def naive() -> object:
        return [moe_viz.run_prompt(model, ids, moe_viz.Capacity(f)) for f in sweeps.DEFAULT_FACTORS]

    return {
        "forward": lambda: moe_viz.run_prompt(model, ids, None),
        "importance_reroute": lambda: importance.expert_importance(model, ids, mode="reroute"),
        "importance_zero": lambda: importance.expert_importance(model, ids, mode="zero"),
        "capacity_sweep": lambda: sweeps.capacity_sweep(model, ids),
        "k_sweep": lambda: sweeps.k_sweep(model, ids),
        "capacity_naive": naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print("loading the default model ...", file=sys.stderr, flush=True)
    model = moe_viz.load_model()
    ids = token_ids(model, args.tokens)
    E = model.num_experts
    routers = sum(1 for site in model.sites if site.spec.substitutable)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; device {model.device}"
    )
    print(
        f"model: {moe_viz.DEFAULT_MODEL}, {routers} MoE layers x {E} experts; prompt {len(ids)} tokens; "
        f"capacity factors {list(sweeps.DEFAULT_FACTORS)}"
    )

    variants = cases(model, ids)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():  # warm up
        t0 = time.perf_counter()
        fn()
        print(f"  warm-up {name}: {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
    for r in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        line = ", ".join(f"{name} {values[-1]:.1f}" for name, values in times.items())
        print(f"  repeat {r + 1}/{args.repeats} (ms): {line}", flush=True)

    med = {name: statistics.median(values) for name, values in times.items()}
    unit = med["forward"]
    print(f"\n{'case':<20} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'x forward':>10}")
    for name, values in times.items():
        print(f"{name:<20} {med[name]:>10.1f} {min(values):>9.1f} {max(values):>9.1f} {med[name] / unit:>10.2f}")
    ratio = med["capacity_sweep"] / unit
    print(
        f"\ngoal: the whole capacity sweep <= {GOAL_RATIO:g}x one forward: {ratio:.2f}x "
        f"({'met' if ratio <= GOAL_RATIO else 'NOT met'}); naive sweep / batched sweep: "
        f"{med['capacity_naive'] / med['capacity_sweep']:.2f}x"
    )


if __name__ == "__main__":
    main()
