"""Page bench, two checkouts side by side: each page's views and figure JSON built by this work
tree and by another checkout (the commit before a change), interleaved in one process.

    git worktree add /tmp/before <commit>
    python bench/page_ab.py /tmp/before                # 60 repeats at 256 tokens
    python bench/page_ab.py /tmp/before --tokens 2048 --repeats 20
    python bench/page_ab.py /tmp/before --model ./my-checkpoint    # any local MoE model, both sides

Each checkout's ``moe_viz`` is imported under a name of its own and loads the default model from
its own ``assets/`` (or both load ``--model``). Every repeat builds each page once per checkout, in alternating order, each on
a fresh trace of the same prompt, and times what ``bench/page.py`` calls ``views`` and ``json``
(the run is left out: the same forward in both). Machine noise hits both alike, so the saving
holds even when the machine's speed drifts between runs of ``bench/page.py``. Prints medians.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import page as page_bench  # noqa: E402  (bench/page.py: the pages and what the browser receives)

import moe_viz  # noqa: E402


def import_checkout(folder: Path, name: str) -> ModuleType:
    """The ``moe_viz`` package of the checkout at ``folder``, imported as ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "moe_viz" / "__init__.py", submodule_search_locations=[str(folder / "moe_viz")]
    )
    if spec is None or spec.loader is None:
        sys.exit(f"{folder} holds no moe_viz package")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the other checkout (e.g. a git worktree at an earlier commit)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--model", type=Path, default=None, help="a local model folder for both sides")
    args = ap.parse_args()
    if not (args.before / "moe_viz").is_dir():
        sys.exit(f"{args.before} is not a moe-viz checkout (no moe_viz/ folder)")
    sides = {"before": import_checkout(args.before.resolve(), "moe_viz_before"), "now": moe_viz}
    runs = {}
    for side, package in sides.items():
        folder = str(args.model) if args.model is not None else package.DEFAULT_MODEL
        model = package.load_model(folder, device="cpu", dtype=torch.float32)
        prompt, _ = page_bench.make_prompt(model, args.tokens)
        runs[side] = (package, model, prompt, importlib.import_module(f"{package.__name__}.views"))
    print(f"before: {args.before}; now: {ROOT}; {args.tokens} tokens; {args.repeats} repeats", flush=True)

    def build(side: str, name: str) -> float:
        package, model, prompt, views = runs[side]
        trace = package.run_prompt(model, prompt, None)
        layer = trace.layer_ids[len(trace.layer_ids) // 2]
        t0 = time.perf_counter()
        shown = page_bench.PAGES[name](trace, layer, trace.num_tokens - 1, views)
        [page_bench.browser_json(view) for view in shown]
        return time.perf_counter() - t0

    for side in sides:  # warm-up
        for name in page_bench.PAGES:
            build(side, name)
    gc.collect()
    gc.freeze()  # as the app's launcher does
    times: dict[tuple[str, str], list[float]] = {(s, n): [] for s in sides for n in page_bench.PAGES}
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in page_bench.PAGES:
            for side in order:
                times[side, name].append(build(side, name))
        if (rep + 1) % 10 == 0:
            print(f"  repeat {rep + 1}/{args.repeats}", flush=True)
    print(f"\nviews + JSON, medians ({args.tokens} tokens)")
    for name in page_bench.PAGES:
        before, now = (statistics.median(times[s, name]) * 1e3 for s in ("before", "now"))
        print(
            f"{name:<13} before {before:6.2f} ms  now {now:6.2f} ms  ({now / before:.2f}x, {before - now:+.2f} ms saved)"
        )


if __name__ == "__main__":
    main()
