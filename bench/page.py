"""Page bench: prompt -> trace -> metrics -> all figures of a page, against the bare model forward.

    python bench/page.py                                  # the default model in assets/
    python bench/page.py --model /tmp/quick-model         # any local MoE checkpoint
    python bench/page.py --model /tmp/quick-model --random-default-size   # untrained weights, default-model shape

For each prompt length (32, 256, 2,048 tokens) and repeat, interleaved, it times

* ``forward``: the bare ``model.model(input_ids)`` under ``torch.inference_mode`` (no policy);
* the page: ``run_prompt`` (tokenize + routed forward + trace), ``metrics`` (balance table and the
  per-layer statistics the pages show), ``figures`` (every chart of the Explore and Load-balance
  pages for one layer, plus the coloured text), ``explain`` (every sentence) and ``json`` (the
  figures serialised as the browser receives them);

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
from moe_viz import explain, figures, metrics

STAGES = ("run", "metrics", "figures", "explain", "json")


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


def page(model: moe_viz.MoEModel, prompt: str, policy: moe_viz.Policy | None) -> tuple[dict[str, float], int]:
    """Seconds per stage of one page build, and the figures' total JSON size in bytes."""
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return out

    trace = timed("run", lambda: moe_viz.run_prompt(model, prompt, policy))
    layer = trace.layer_ids[len(trace.layer_ids) // 2]
    lt = trace.layer(layer)
    position = trace.num_tokens - 1

    def compute_metrics() -> None:
        metrics.balance_table(trace)
        metrics.router_entropy(lt)
        metrics.topk_margin(lt)
        metrics.coactivation(lt)
        metrics.reuse(lt)

    timed("metrics", compute_metrics)

    def build_figures() -> list[Any]:
        return [
            figures.token_expert_heatmap(trace, layer),
            figures.layer_load_heatmap(trace),
            figures.expert_load_bars(trace, layer),
            figures.router_distribution(trace, layer, position),
            figures.predictions_bar(trace, position),
            figures.coactivation_heatmap(trace, layer),
            figures.token_text_html(trace, layer),
        ]

    figs = timed("figures", build_figures)

    def sentences() -> None:
        explain.explain_heatmap(trace, layer)
        explain.explain_token_text(trace, layer)
        explain.explain_load(trace, layer)
        explain.explain_router_distribution(trace, layer, position)
        explain.explain_predictions(trace, position)
        explain.explain_coactivation(trace, layer)
        explain.explain_reuse(trace, layer)
        explain.explain_balance_table(trace)
        explain.explain_capacity(trace)

    timed("explain", sentences)
    payload = timed("json", lambda: [f if isinstance(f, str) else f.to_json() for f in figs])
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
    ap.add_argument("--random-default-size", action="store_true",
                    help="use untrained weights with the default model's shape (tokenizer from --model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="native", help="policy of the page, e.g. native, capacity:1.0, top-k:1")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = moe_viz.parse_policy(args.policy)
    model = load(args)
    print(f"model {model.model_id}: {len(model.moe_layers)} MoE layers x {model.num_experts} experts, top-{model.top_k}; "
          f"policy {moe_viz.policy_spec(policy)}; {torch.get_num_threads()} threads; {args.repeats} repeats", flush=True)
    prompts = {n: make_prompt(model, n) for n in args.lengths}
    for prompt, ids in prompts.values():  # warm-up
        bare_forward(model, ids)
        page(model, prompt, policy)
    fwd: dict[int, list[float]] = {n: [] for n in args.lengths}
    stage: dict[int, dict[str, list[float]]] = {n: {s: [] for s in STAGES} for n in args.lengths}
    total: dict[int, list[float]] = {n: [] for n in args.lengths}
    size: dict[int, int] = {}
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for n in args.lengths:  # interleaved: forward then page, length by length, every repeat
            prompt, ids = prompts[n]
            fwd[n].append(bare_forward(model, ids))
            times, size[n] = page(model, prompt, policy)
            for s in STAGES:
                stage[n][s].append(times[s])
            total[n].append(sum(times.values()))
        print(f"  repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    med = statistics.median
    header = f"{'tokens':>7} {'forward ms':>11} {'page ms':>9} {'ratio':>6}  " + " ".join(f"{s:>8}" for s in STAGES) + f" {'JSON KB':>8}"
    print("\nmedians; stage columns are shares of the page time ('run' includes its own routed forward)")
    print(header)
    print("-" * len(header))
    for n in args.lengths:
        T = prompts[n][1].shape[1]
        f, p = med(fwd[n]), med(total[n])
        shares = " ".join(f"{med(stage[n][s]) / p:>8.0%}" for s in STAGES)
        print(f"{T:>7} {f * 1e3:>11.1f} {p * 1e3:>9.1f} {p / f:>6.2f}  {shares} {size[n] / 1024:>8.0f}")
    if 256 in prompts:
        r = med(total[256]) / med(fwd[256])
        print(f"\ntarget page/forward <= 2.0 at 256 tokens: {r:.2f} ({'met' if r <= 2.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
