"""Corpus tokens/s on a Ray Data actor pool against the in-process run, side by side.

    python bench/corpus_ray.py                 # 3 interleaved rounds, the demo corpus once, 2 workers
    python bench/corpus_ray.py --copies 4      # the demo corpus 4 times over: the pool's start amortised
    python bench/corpus_ray.py --workers 4 --address auto   # on a running cluster

On the shipped default model and demo corpus (``assets/demo-corpus/texts``: 84 documents, ~47.6k
tokens; ``--copies`` n writes it n times into a temp folder, ``<domain>/c<copy>-<file>``), with
``run_corpus``'s defaults (window 512, token budget 4,096, native routing):

* ``local``: ``run_corpus(model, source)`` in this process (the model loaded once, before the
  timing; torch's own thread count);
* ``ray``: ``run_corpus_ray(None, source, workers=N)`` on a Ray runtime started once before the
  rounds (``ray.init(num_cpus=...)``, not timed); each call starts its pool of N actors, each
  loading the model once, and that start is inside the timing (it is part of every run). The time
  until the first shard comes back is printed as "first shard": mostly the pool's start.

One warm-up of each on ``--warmup-docs`` documents, then ``--repeats`` rounds, each timing local
then ray; both results are checked equal (``aggregates.equal``) in every round. Prints the medians,
tokens/s and the ratio ray / local, with the machine and the 1-minute load average (above the CPU
count, the figures are contended).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_viz, installed or not
import moe_viz  # noqa: E402
from moe_viz.corpus import aggregates, open_source, run_corpus  # noqa: E402
from moe_viz.corpus.distributed import run_corpus_ray  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-corpus" / "texts"


def machine_line() -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
        f"python {platform.python_version()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def copied_corpus(copies: int, folder: Path) -> Path:
    """The demo corpus written ``copies`` times into ``folder`` (same domain sub-folders)."""
    if copies == 1:
        return DEMO
    for path in sorted(DEMO.rglob("*.txt")):
        for c in range(copies):
            target = folder / path.parent.name / f"c{c}-{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def time_local(model: moe_viz.MoEModel, source) -> tuple[float, aggregates.CorpusAggregates]:  # noqa: ANN001
    t0 = time.perf_counter()
    agg = run_corpus(model, source)
    return time.perf_counter() - t0, agg


def time_ray(source, workers: int) -> tuple[float, float, aggregates.CorpusAggregates]:  # noqa: ANN001
    """(wall seconds, seconds to the first shard, aggregates) of one Ray run."""
    first: list[float] = []
    t0 = time.perf_counter()
    agg = run_corpus_ray(None, source, workers=workers, progress=lambda p: first.append(time.perf_counter() - t0))
    return time.perf_counter() - t0, first[0], agg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (default 2)")
    parser.add_argument("--copies", type=int, default=1, help="the demo corpus this many times over (default 1)")
    parser.add_argument("--warmup-docs", type=int, default=7, help="documents in each warm-up run (default 7)")
    parser.add_argument("--address", help="a running Ray cluster (default: a local runtime with all the CPUs)")
    args = parser.parse_args()
    import ray

    print(machine_line(), flush=True)
    model = moe_viz.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        source = open_source(copied_corpus(args.copies, Path(tmp)))
        t0 = time.perf_counter()
        if args.address:
            ray.init(address=args.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        print(f"ray {ray.__version__} runtime up in {time.perf_counter() - t0:.1f} s (not timed below)", flush=True)
        try:
            run_corpus(model, source, max_documents=args.warmup_docs)
            run_corpus_ray(None, source, workers=args.workers, max_documents=args.warmup_docs)
            rows = []
            for r in range(args.repeats):
                local_s, local = time_local(model, source)
                ray_s, first_s, distributed = time_ray(source, args.workers)
                if not aggregates.equal(local, distributed):
                    raise RuntimeError("the Ray run's aggregates differ from the in-process run's")
                rows.append((local_s, ray_s, first_s))
                print(
                    f"  round {r + 1}: local {local_s:.1f} s, ray {ray_s:.1f} s (first shard at {first_s:.1f} s); "
                    f"equal counts; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            ray.shutdown()
    tokens = local.total_tokens
    local_s = statistics.median(r[0] for r in rows)
    ray_s = statistics.median(r[1] for r in rows)
    first_s = statistics.median(r[2] for r in rows)
    print(f"\n{tokens:,} tokens ({args.copies}x the demo corpus), {args.workers} Ray workers, median of {len(rows)}:\n")
    print("| engine | seconds | tokens/s | × local |")
    print("|---|---|---|---|")
    print(f"| in-process `run_corpus` | {local_s:.1f} | {tokens / local_s:,.0f} | 1.00 |")
    print(
        f"| Ray, {args.workers} workers (pool start included; first shard at {first_s:.1f} s) | {ray_s:.1f} | "
        f"{tokens / ray_s:,.0f} | **{local_s / ray_s:.2f}** |"
    )


if __name__ == "__main__":
    main()
