"""Page bench: prompt -> trace -> every view of a page (statistics, figures, explanations), against the bare forward.

    python bench/page.py                                  # the default model in assets/
    python bench/page.py --model /tmp/quick-model         # any local MoE checkpoint
    python bench/page.py --model /tmp/quick-model --random-default-size   # untrained weights, default-model shape

For each prompt length (32, 256, 2,048 tokens) and repeat, interleaved, it times

* ``forward``: the bare ``model.model(input_ids)`` under ``torch.inference_mode`` (no policy);
* each page built from scratch, as the app builds it for one layer: ``run_prompt`` (tokenize +
  routed forward + trace), ``views`` (every view of the page from ``moe_viz.views``: statistics,
  figure and explanation together) and ``json`` (the figures serialised as the browser receives
  them). Pages: Explore and Load balance;

and prints medians: page / forward (target <= 2.0 at 256 tokens), each stage's share of the page
and the figures' JSON size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import moe_viz
from moe_viz import views

STAGES = ("run", "views", "json")


def make_prompt(model: moe_viz.MoEModel, n_tokens: int) -> tuple[str, torch.Tensor]:
    """A prompt of about ``n_tokens`` tokens (repeated English/code text) and its input ids."""
    base = (
        "The router of a mixture-of-experts layer sends every token to a few experts. "
        "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"
        "Load balancing keeps each expert busy; capacity limits drop the overflow. "
    )
    text = base
    tok = model.tokenizer
    while tok(text, return_tensors="pt")["input_ids"].shape[1] < n_tokens + 8:
        text += base * max(1, n_tokens // 64)
    ids = tok(text, return_tensors="pt")["input_ids"][0][:n_tokens].tolist()
    prompt = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    input_ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)  # (1, T')
    return prompt, input_ids


def bare_forward(model: moe_viz.MoEModel, input_ids: torch.Tensor) -> float:
    """Seconds for one bare forward of the wrapped transformers model."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.model(input_ids=input_ids, use_cache=False)
    return time.perf_counter() - t0


def _explore(trace: moe_viz.Trace, layer: int, position: int) -> list[views.View]:
    """Every view of the Explore page, as the page builds them (the run summary line included)."""
    views.run_summary(trace)
    return views.explore_views(trace, layer) + views.token_views(trace, layer, position)


def _load_balance(trace: moe_viz.Trace, layer: int, position: int) -> list[views.View]:
    """Every view of the Load balance page, its metric cards included."""
    views.metric_cards(trace, layer)
    return views.balance_views(trace, layer)


PAGES = {"explore": _explore, "load balance": _load_balance}


def page(
    model: moe_viz.MoEModel, prompt: str, policy: moe_viz.Policy | None, name: str = "explore"
) -> tuple[dict[str, float], int]:
    """Seconds per stage of one build of page ``name`` from scratch, and its figures' JSON bytes."""
    times: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
        return out

    trace = timed("run", lambda: moe_viz.run_prompt(model, prompt, policy))
    layer = trace.layer_ids[len(trace.layer_ids) // 2]
    shown = timed("views", lambda: PAGES[name](trace, layer, trace.num_tokens - 1))
    payload = timed(
        "json",
        lambda: [v.figure.to_json() if v.figure is not None else v.html or v.table.to_json() for v in shown],
    )
    return times, sum(len(p.encode("utf-8")) for p in payload)


def load(args: argparse.Namespace) -> moe_viz.MoEModel:
    path = args.model or moe_viz.DEFAULT_MODEL
    if not Path(path).is_dir():
        sys.exit(
            f"model folder {path} not found; train it (scripts/train_default_model.py) or pass --model PATH, e.g. "
            "python scripts/train_default_model.py --quick --out /tmp/quick-model"
        )
    model = moe_viz.load_model(path, device="cpu", dtype=torch.float32)
    if not args.random_default_size:
        return model
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_default_model import ModelSpec  # the default model's architecture

    spec = ModelSpec()
    config = transformers.MixtralConfig(
        **{name: getattr(spec, name) for name in spec.__dataclass_fields__}, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    net = transformers.MixtralForCausalLM(config).eval()
    return moe_viz.wrap_model(net, model.tokenizer, f"random {spec.hidden_size}d x {spec.num_hidden_layers} layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model folder (default: the model in assets/)")
    ap.add_argument(
        "--random-default-size",
        action="store_true",
        help="use untrained weights with the default model's shape (tokenizer from --model)",
    )
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="native", help="policy of the page, e.g. native, capacity:1.0, top-k:1")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = moe_viz.parse_policy(args.policy)
    model = load(args)
    print(
        f"model {model.model_id}: {len(model.moe_layers)} MoE layers x {model.num_experts} experts, top-{model.top_k}; "
        f"policy {moe_viz.policy_spec(policy)}; {torch.get_num_threads()} threads; {args.repeats} repeats",
        flush=True,
    )
    prompts = {n: make_prompt(model, n) for n in args.lengths}
    for prompt, ids in prompts.values():  # warm-up
        bare_forward(model, ids)
        for name in PAGES:
            page(model, prompt, policy, name)
    fwd: dict[int, list[float]] = {n: [] for n in args.lengths}
    stage = {(n, p): {s: [] for s in STAGES} for n in args.lengths for p in PAGES}
    total: dict[tuple[int, str], list[float]] = {key: [] for key in stage}
    size: dict[tuple[int, str], int] = {}
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for n in args.lengths:  # interleaved: forward then each page, length by length, every repeat
            prompt, ids = prompts[n]
            fwd[n].append(bare_forward(model, ids))
            for name in PAGES:
                times, size[n, name] = page(model, prompt, policy, name)
                for s in STAGES:
                    stage[n, name][s].append(times[s])
                total[n, name].append(sum(times.values()))
        print(f"  repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    med = statistics.median
    header = (
        f"{'page':<13} {'tokens':>6} {'forward ms':>11} {'page ms':>8} {'ratio':>6}  "
        + " ".join(f"{s:>8}" for s in STAGES)
        + f" {'JSON KB':>8}"
    )
    print("\nmedians; stage columns are shares of the page time ('run' includes its own routed forward)")
    print(header)
    print("-" * len(header))
    for name in PAGES:
        for n in args.lengths:
            T = prompts[n][1].shape[1]
            f, p = med(fwd[n]), med(total[n, name])
            shares = " ".join(f"{med(stage[n, name][s]) / p:>8.0%}" for s in STAGES)
            print(
                f"{name:<13} {T:>6} {f * 1e3:>11.1f} {p * 1e3:>8.1f} {p / f:>6.2f}  {shares} {size[n, name] / 1024:>8.0f}"
            )
    if 256 in prompts:
        for name in PAGES:
            r = med(total[256, name]) / med(fwd[256])
            print(f"target page/forward <= 2.0 at 256 tokens, {name}: {r:.2f} ({'met' if r <= 2.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
