"""What does tracing cost? Side by side, in one run, on tiny Mixtral, OLMoE and DeepSeek-V3 models.

For each model and prompt length (64, 256, 1024 tokens), every variant once per round, in a fresh
random order each round, so machine noise and warm caches favour no variant (median ms over rounds):

* ``plain``: the model's forward, never instrumented. The instrumented model is a copy of its
  modules that shares its weight tensors (the same memory), so every ratio against ``plain``
  measures work, not where two copies' weights happen to sit;
* ``twin``: the forward of a full copy (weights copied too), whose weights sit elsewhere and are
  not warmed in the CPU caches by the other variants: ``twin / plain`` shows how much that alone
  moves a ratio on this machine (several per cent on these tiny models);
* ``idle``: the instrumented model's own forward outside any call (its hooks installed, idle);
* ``traced``: moe-viz's native-routing forward with every router recorded, plus building the
  per-layer routing trace (``active_call(None)`` + ``build_layers``) — what the app needs.
  ``traced / idle`` is what tracing adds on the very same weights;
* ``run_prompt``: the whole ``run_prompt`` (also tokenises; where the output head is proven plain,
  the model projects the last row only and the rest are left to be projected when read);
* ``router_logits``: the plain model with ``output_router_logits=True``;
* ``nnsight``: nnsight tracing that saves every router's output (optional; ``pip install nnsight``).

Prints ratios against ``plain`` and ``traced / idle`` (target: traced <= 1.02x, even at 64 tokens).
Run: ``python bench/overhead.py``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import TINY_CONFIGS, ByteTokenizer  # noqa: E402

from moe_viz import run_prompt, wrap_model  # noqa: E402
from moe_viz._hooks import active_call  # noqa: E402
from moe_viz._trace_build import Part, build_layers  # noqa: E402

SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MODELS = ("mixtral", "olmoe", "deepseek_v3")


def _model(model_type: str) -> torch.nn.Module:
    import transformers

    class_name, overrides = TINY_CONFIGS[model_type]
    overrides = {**overrides, **SIZE, "vocab_size": 256, "max_position_embeddings": 2048}
    if "moe_intermediate_size" in overrides:
        overrides["moe_intermediate_size"] = 128
    config = getattr(transformers, class_name)(**overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(std=0.5)
    return model


def _same_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules (so hooks installed on it leave ``model`` plain) that uses the
    very same parameter and buffer tensors: a ratio between the two then measures the work done,
    not where two copies' weights happen to sit in memory or which copy the caches hold."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def _nnsight_runner(plain: torch.nn.Module, ids: torch.Tensor) -> Callable[[], object] | None:
    try:
        import nnsight
    except ImportError:
        return None
    wrapped = nnsight.NNsight(plain)
    gates = [name for name, _ in plain.named_modules() if name.endswith("mlp.gate")]

    def run() -> object:
        with wrapped.trace(ids):
            outputs = nnsight.save([_module(wrapped, name).output for name in gates])
        return outputs

    return run


def _module(root: object, path: str) -> object:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def bench(model_type: str, tokens: int, rounds: int) -> dict[str, float]:
    plain = _model(model_type)
    twin = copy.deepcopy(plain)
    traced_model = wrap_model(_same_weights(plain), ByteTokenizer(), model_type)
    ids = torch.randint(32, 127, (1, tokens))
    prompt = bytes(ids[0].tolist()).decode()

    def traced() -> object:
        with active_call(None) as recorder:
            traced_model.model(input_ids=ids, use_cache=False)
        return build_layers(traced_model, [Part(recorder.forwards[0], slice(None))])

    variants: dict[str, Callable[[], object]] = {
        "plain": lambda: plain(input_ids=ids, use_cache=False),
        "twin": lambda: twin(input_ids=ids, use_cache=False),
        "idle": lambda: traced_model.model(input_ids=ids, use_cache=False),
        "traced": traced,
        "run_prompt": lambda: run_prompt(traced_model, prompt, None),
        "router_logits": lambda: plain(input_ids=ids, use_cache=False, output_router_logits=True),
    }
    nn_run = _nnsight_runner(plain, ids)
    if nn_run is not None:
        variants["nnsight"] = nn_run
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm up
            fn()
        names = list(variants)
        order = random.Random(0)
        for _ in range(rounds):
            # A fresh order every round: the tiny models fit in the CPU caches, so a variant that
            # always ran right after another one on the same weights would always find them warm.
            order.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model_type in MODELS:
        for tokens in args.tokens:
            med = bench(model_type, tokens, args.rounds)
            rows.append((model_type, tokens, med))
            print(f"done {model_type} @ {tokens} tokens", file=sys.stderr, flush=True)
    names = ["twin", "traced", "run_prompt", "router_logits", "nnsight"]
    print(
        f"\n{'model':<12} {'tokens':>6} {'plain ms':>9} "
        + " ".join(f"{n + '/plain':>19}" for n in names)
        + f" {'traced/idle':>12} {'traced/router_logits':>21} {'traced/nnsight':>15}"
    )
    for model_type, tokens, med in rows:
        ratios = " ".join(f"{med[n] / med['plain']:>19.3f}" if n in med else f"{'n/a':>19}" for n in names)
        vs_idle = med["traced"] / med["idle"]
        vs_rl = med["traced"] / med["router_logits"]
        vs_nn = f"{med['traced'] / med['nnsight']:>15.3f}" if "nnsight" in med else f"{'n/a':>15}"
        print(f"{model_type:<12} {tokens:>6} {med['plain']:>9.2f} {ratios} {vs_idle:>12.3f} {vs_rl:>21.3f} {vs_nn}")


if __name__ == "__main__":
    main()
