"""Page bench: prompt -> trace -> every view of a page (statistics, figures, explanations), against the bare forward.

    python bench/page.py                                  # the default model in assets/
    python bench/page.py --model /tmp/quick-model         # any local MoE checkpoint
    python bench/page.py --model /tmp/quick-model --random-default-size   # untrained weights, default-model shape
    python bench/page.py --wide                           # also a thin random 256-expert x 61-layer model at 256 tokens
    python bench/page.py --large                          # also a larger random Mixtral-style model at 256 tokens

For each prompt length (32, 256, 2,048 tokens) and repeat, interleaved, it times

* ``forward``: the bare ``model.model(input_ids)`` under ``torch.inference_mode`` (no policy), which
  projects every position onto the vocabulary;
* ``body``: the same with ``logits_to_keep=1`` (the last position's logits only). Where the model's
  output head is proven plain (``moe_viz/_output_head.py``) ``run_prompt`` runs this and projects
  the rows a page reads, so ``page / body`` is what a page adds to the model's own work beside
  ``page / forward``, the issue's measure;
* each page built from scratch, as the app builds it for one layer: ``run_prompt`` (tokenize +
  routed forward + trace), ``views`` (every view of the page from ``moe_viz.views``: statistics,
  figure and explanation together) and ``json`` (each figure turned into the JSON the browser
  receives, by the two calls ``st.plotly_chart`` makes). Pages: Explore and Load balance;

and prints medians: page / forward (target <= 1.3 at 256 tokens), each stage's share of the page
and the figures' JSON size. Like the app's launcher (``moe-viz app``), it sets the objects alive
after loading and warming up aside from garbage collection before it measures.

The fixed costs of a page (views, JSON) weigh more the faster the forward, so ``--large`` adds a
random Mixtral-style model of a larger shape (hidden 512, 8 layers of 16 experts, top-2,
vocabulary 32,000; the default model's tokenizer) at 256 tokens, side by side with the others.

``--wide`` adds, in the same interleaved repeats, a thin random model of DeepSeek-V3's routing shape
(256 experts, 61 MoE layers, top-8; hidden size 16, ``tests/wide_models.py``) saved to a temporary
folder and loaded with ``moe_viz.load_model``, measured at 256 tokens, and prints it side by side
with the benched model at 256 tokens. Its forward is far cheaper than a real 256-expert model's, so
its page / forward overstates what the views add to a real model of that shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's moe_viz, installed or not
import moe_viz  # noqa: E402
from app.launch import freeze_loaded_objects  # noqa: E402
from moe_viz import views  # noqa: E402
from moe_viz.views._plotly import wire_json  # noqa: E402

STAGES = ("run", "views", "json")
WIDE_SHAPE = "deepseek-v3-like"  # tests/wide_models.py: 256 experts, 61 layers, top-8
WIDE_TOKENS = 256  # the length at which the extra models (--wide, --large) are measured
LARGE_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=16,
    num_experts_per_tok=2,
    vocab_size=32000,
)


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


def bare_forward(model: moe_viz.MoEModel, input_ids: torch.Tensor, last_only: bool = False) -> float:
    """Seconds for one bare forward of the wrapped transformers model (``last_only``: the last
    position's logits only)."""
    keep = {"logits_to_keep": 1} if last_only else {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.model(input_ids=input_ids, use_cache=False, **keep)
    return time.perf_counter() - t0


def _explore(trace: moe_viz.Trace, layer: int, position: int, v: ModuleType = views) -> list[views.View]:
    """Every view of the Explore page, as the page builds them (the run summary line included);
    ``v``: the ``moe_viz.views`` module to build them with (``page_ab.py`` passes another checkout's)."""
    v.run_summary(trace)
    return v.explore_views(trace, layer) + v.token_views(trace, layer, position)


def _load_balance(trace: moe_viz.Trace, layer: int, position: int, v: ModuleType = views) -> list[views.View]:
    """Every view of the Load balance page, its metric cards included."""
    v.metric_cards(trace, layer)
    return v.balance_views(trace, layer)


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
    payload = timed("json", lambda: [browser_json(v) for v in shown])
    return times, sum(len(p.encode("utf-8")) for p in payload)


def browser_json(view: views.View) -> str:
    """What the browser receives for ``view``: a figure as ``st.plotly_chart`` serialises it (its
    two plotly calls), a table as JSON, HTML as is."""
    if view.figure is not None:
        return wire_json(view.figure)
    return view.html or view.table.to_json()


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

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_default_model import ModelSpec  # the default model's architecture

    spec = ModelSpec()
    config = transformers.MixtralConfig(
        **{name: getattr(spec, name) for name in spec.__dataclass_fields__}, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    net = transformers.MixtralForCausalLM(config).eval()
    return moe_viz.wrap_model(net, model.tokenizer, f"random {spec.hidden_size}d x {spec.num_hidden_layers} layers")


def load_wide(folder: Path) -> moe_viz.MoEModel:
    """The thin random model of DeepSeek-V3's routing shape, saved to ``folder`` and loaded from it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from wide_models import SHAPES, save_wide_model

    experts, layers, top_k = SHAPES[WIDE_SHAPE]
    save_wide_model(folder, experts, layers, top_k)
    return moe_viz.load_model(str(folder), device="cpu", dtype=torch.float32)


def load_large(tokenizer_model: moe_viz.MoEModel) -> moe_viz.MoEModel:
    """A random Mixtral-style model of ``LARGE_SHAPE`` (fp32), with the default model's tokenizer."""
    import transformers

    config = transformers.MixtralConfig(**LARGE_SHAPE, max_position_embeddings=4096)
    torch.manual_seed(0)
    net = transformers.MixtralForCausalLM(config).eval()
    size = f"{LARGE_SHAPE['hidden_size']}d x {LARGE_SHAPE['num_hidden_layers']} layers"
    return moe_viz.wrap_model(net, tokenizer_model.tokenizer, f"random Mixtral-style {size}")


def describe(model: moe_viz.MoEModel) -> str:
    return f"{len(model.moe_layers)} MoE layers x {model.num_experts} experts, top-{model.top_k}"


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
    ap.add_argument(
        "--wide",
        action="store_true",
        help=f"also bench a thin random {WIDE_SHAPE} model (256 experts x 61 layers) at {WIDE_TOKENS} tokens",
    )
    ap.add_argument(
        "--large",
        action="store_true",
        help=f"also bench a larger random Mixtral-style model (hidden 512, 8 layers) at {WIDE_TOKENS} tokens",
    )
    args = ap.parse_args()
    if (args.wide or args.large) and WIDE_TOKENS not in args.lengths:
        args.lengths.append(WIDE_TOKENS)  # the benched model at the same length, side by side
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = moe_viz.parse_policy(args.policy)
    models = {"model": load(args)}
    model = models["model"]
    wide_dir = tempfile.TemporaryDirectory(prefix="page-bench-wide-") if args.wide else None
    if wide_dir is not None:
        models["wide"] = load_wide(Path(wide_dir.name))
    if args.large:
        models["large"] = load_large(model)
    print(
        f"model {model.model_id}: {describe(model)}; "
        f"policy {moe_viz.policy_spec(policy)}; {torch.get_num_threads()} threads; {args.repeats} repeats",
        flush=True,
    )
    labels = {"model": f"benched ({describe(model)})"}
    if "wide" in models:
        labels["wide"] = f"wide ({describe(models['wide'])})"
    if "large" in models:
        labels["large"] = f"large ({describe(models['large'])})"
    for m in labels.keys() - {"model"}:
        print(f"{labels[m]}: {models[m].model_id}, at {WIDE_TOKENS} tokens", flush=True)
    # (model, length) cases in run order: the extra models right after the benched one at their length
    cases = [("model", n) for n in args.lengths]
    extra = [m for m in ("wide", "large") if m in models]
    if extra:
        at = cases.index(("model", WIDE_TOKENS)) + 1
        cases[at:at] = [(m, WIDE_TOKENS) for m in extra]
    prompts = {(m, n): make_prompt(models[m], n) for m, n in cases}
    for m, n in cases:  # warm-up
        prompt, ids = prompts[m, n]
        bare_forward(models[m], ids)
        bare_forward(models[m], ids, last_only=True)
        for name in PAGES:
            page(models[m], prompt, policy, name)
    frozen = freeze_loaded_objects()  # as the app's launcher does once its models are loaded and warm
    print(f"{frozen} objects set aside from garbage collection, as in the app's server", flush=True)
    fwd: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    body: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    stage = {(m, n, p): {s: [] for s in STAGES} for m, n in cases for p in PAGES}
    total: dict[tuple[str, int, str], list[float]] = {key: [] for key in stage}
    size: dict[tuple[str, int, str], int] = {}
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for m, n in cases:  # interleaved: forward then each page, case by case, every repeat
            prompt, ids = prompts[m, n]
            fwd[m, n].append(bare_forward(models[m], ids))
            body[m, n].append(bare_forward(models[m], ids, last_only=True))
            for name in PAGES:
                times, size[m, n, name] = page(models[m], prompt, policy, name)
                for s in STAGES:
                    stage[m, n, name][s].append(times[s])
                total[m, n, name].append(sum(times.values()))
        print(f"  repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if wide_dir is not None:
        wide_dir.cleanup()

    med = statistics.median
    header = (
        f"{'page':<13} {'tokens':>6} {'forward ms':>11} {'body ms':>8} {'page ms':>8} {'ratio':>6} {'/ body':>6}  "
        + " ".join(f"{s:>8}" for s in STAGES)
        + f" {'JSON KB':>8}"
    )
    print(
        "\nmedians; ratio = page / forward, / body = page / body (the forward without the vocabulary);"
        " stage columns are shares of the page time ('run' includes its own routed forward)"
    )
    print(header)
    print("-" * len(header))
    for name in PAGES:
        for n in args.lengths:
            T = prompts["model", n][1].shape[1]
            f, b, p = med(fwd["model", n]), med(body["model", n]), med(total["model", n, name])
            shares = " ".join(f"{med(stage['model', n, name][s]) / p:>8.0%}" for s in STAGES)
            print(
                f"{name:<13} {T:>6} {f * 1e3:>11.1f} {b * 1e3:>8.1f} {p * 1e3:>8.1f} {p / f:>6.2f} {p / b:>6.2f}  "
                f"{shares} {size['model', n, name] / 1024:>8.0f}"
            )
    if extra:
        print(f"\n{WIDE_TOKENS} tokens, side by side (same interleaved repeats); medians")
        header = (
            f"{'page':<13} {'model':<44} {'forward ms':>11} {'body ms':>8} {'page ms':>8} {'ratio':>6} {'/ body':>6}  "
            + " ".join(f"{s:>8}" for s in STAGES)
            + f" {'JSON KiB':>9}"
        )
        print(header)
        print("-" * len(header))
        for name in PAGES:
            for m in ("model", *extra):
                f, p = med(fwd[m, WIDE_TOKENS]), med(total[m, WIDE_TOKENS, name])
                b = med(body[m, WIDE_TOKENS])
                shares = " ".join(f"{med(stage[m, WIDE_TOKENS, name][s]) / p:>8.0%}" for s in STAGES)
                print(
                    f"{name:<13} {labels[m]:<44} {f * 1e3:>11.1f} {b * 1e3:>8.1f} {p * 1e3:>8.1f} {p / f:>6.2f} "
                    f"{p / b:>6.2f}  {shares}"
                    f" {size[m, WIDE_TOKENS, name] / 1024:>9.1f}"
                )
    if 256 in args.lengths:
        print()
        for m in ("model", *(e for e in extra if e != "wide")):  # the thin wide model's forward is no yardstick
            for name in PAGES:
                r = med(total[m, 256, name]) / med(fwd[m, 256])
                verdict = "met" if r <= 1.3 else "NOT met"
                print(
                    f"target page/forward <= 1.3 at 256 tokens, {labels[m].split(' (')[0]} model, {name}: {r:.2f} ({verdict})"
                )


if __name__ == "__main__":
    main()
