"""What does a corpus run cost? Tokens/s against the plain forward, and peak memory against corpus size.

    python bench/corpus.py                    # 3 repeats; memory at 1x, 4x, 16x a 28-document base
    python bench/corpus.py --quick            # 1 repeat; memory at 1x, 4x
    python bench/corpus.py --base-docs 0 --threads 2   # memory on the whole demo corpus as 1x (~20 min)

On the shipped default model (``moe_viz.load_model()``, offline from assets/) and the shipped demo
corpus (``assets/demo-corpus/texts``: 84 documents in 7 domain folders, ~47.6k tokens):

1. **Throughput**, in this process, over the whole demo corpus (always all 84 documents):

   * ``corpus``: ``run_corpus(model, source)`` with its defaults (window 512, token budget 4096,
     native routing, no importance, no out folder): corpus tokens / wall seconds of the call;
   * ``plain``: the same batches, built beforehand with the run's own ``chunk_documents`` +
     ``pack_batches`` + ``_padded`` (so the padding is identical), each run once through
     ``model.model(input_ids=..., use_cache=False)`` under ``torch.inference_mode()`` with no
     active call (moe-viz's hooks installed but idle) and nothing else: real tokens / seconds of
     the forwards alone;
   * ``paired``: one more corpus run with ``_forward`` wrapped so that each batch's plain forward
     runs right after the run's own, timed apart; corpus seconds = the call less those. Both sides
     then see the same second of machine load, so this ratio holds when other processes compete
     for the CPUs (the 1-minute load average is printed at every step to show when they did).

   One warm-up of each (a corpus run over the first ``--warmup-docs`` documents, the plain forward
   of the first 3 batches), then ``--repeats`` rounds, each timing ``corpus``, ``plain`` and
   ``paired`` in turn; medians and the ratio corpus / plain (goal >= 0.9x), with each case's user
   and system CPU seconds and minor page faults. During the ``corpus`` runs the functions of
   ``moe_viz.corpus.run`` the run calls by name (``_padded``, ``_forward``, ``_token_rows``,
   ``_layer_routing``, ``reduce_batch``, ``merge``, ``count_documents``) are wrapped with a timer in
   that module's namespace (microseconds a batch); the rest of the call (tokenising, chunking,
   ``_meta``) is "other". The median split says where the time beyond the forward goes.

2. **Peak memory vs corpus size**: for each of ``--sizes`` (default 1, 4, 16) a fresh subprocess
   (``python bench/corpus.py --child ...``) loads the model and runs the corpus once;
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak RSS, KiB) is read after the model load and
   at the end (``VmHWM`` from /proc as a cross-check; the memory runs go first, while this process
   holds no model, since a child's ru_maxrss starts from its parent's at exec). The corpus of size
   n is the base corpus written n times into a temp folder with the same domain sub-folders
   (``<domain>/c<copy>-<file>``, distinct names). The base is ``--base-docs`` N (default 28; 0 =
   all 84) demo documents taken round-robin over the domains (the first of each, then the second,
   ...) so every domain stays in; the default keeps the whole bench near 10 minutes on 2 CPU cores.
   Also per size: the run's time split, and the bytes the aggregates hold at the end; with
   ``--memory-plain``, one more fresh process per size runs only the plain forwards of the same
   batches, to tell the forward's own memory from the run's. Goal: flat,
   the increase over the load at the largest size within 10% (or 32 MiB) of the increase at 1x.
   Copies add documents but no new token ids: what the aggregates keep per token (the "vocab
   rows") stops growing sooner than it would on new text of the same size.

Prints the machine and Markdown tables of the results at the end; progress lines on the way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_viz, installed or not
import moe_viz  # noqa: E402
from moe_viz.corpus import open_source, run  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-corpus" / "texts"
GOAL_RATIO = 0.9
FLAT_FRACTION, FLAT_MIB = 0.10, 32.0
TIMED = ("_padded", "_forward", "_token_rows", "_layer_routing", "reduce_batch", "merge", "count_documents")
# 4 documents a domain (~16k tokens): the default run (1x, 4x, 16x: 21x the base, ~330k tokens) stays
# near 10 minutes on 2 shared CPU cores; --base-docs 0 takes all 84 (~1M tokens, 20 minutes under load)
DEFAULT_BASE_DOCS = 28


def _mib(kib: float) -> float:
    return kib / 1024.0


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _current_kib() -> int | None:
    """VmRSS: resident memory now."""
    return _status_kib("VmRSS")


def _usage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _hwm_kib() -> int | None:
    """VmHWM: this process's own peak RSS (unlike ru_maxrss, not carried over from the parent at exec)."""
    return _status_kib("VmHWM")


LOADS: list[float] = []  # the 1-minute load average at each step of this run


def _load() -> float:
    """The 1-minute load average now (also kept in LOADS): above the CPU count, times are contended."""
    value = os.getloadavg()[0]
    LOADS.append(value)
    return value


def machine_line() -> str:
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}; python {platform.python_version()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


# ---- throughput ---------------------------------------------------------------------------------


def plain_batches(model: moe_viz.MoEModel, source) -> list[tuple[torch.Tensor, int]]:  # noqa: ANN001
    """The run's batches, built as ``run_corpus`` builds them: (ids, real tokens) per batch."""
    limit = model.max_positions
    window = min(run.DEFAULT_WINDOW, limit or run.DEFAULT_WINDOW)
    out = []
    for batch in run.pack_batches(run.chunk_documents(model, source.documents(), window), run.DEFAULT_TOKEN_BUDGET):
        ids, mask = run._padded(model, batch)
        out.append((ids.to(model.device), int(mask.sum())))
    return out


def plain_forward(model: moe_viz.MoEModel, batches: list[tuple[torch.Tensor, int]]) -> tuple[float, int]:
    """Seconds of the forwards alone, and real tokens."""
    seconds, tokens = 0.0, 0
    for ids, n in batches:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.model(input_ids=ids, use_cache=False)
        seconds += time.perf_counter() - t0
        tokens += n
    return seconds, tokens


def _delta(before: tuple[float, float, int], wall: float) -> dict[str, float]:
    user, system, faults = (a - b for a, b in zip(_usage(), before))
    return {"wall": wall, "user": user, "sys": system, "minflt": faults}


class SplitTimer:
    """Wraps functions in ``moe_viz.corpus.run``'s namespace and adds up their seconds."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.seconds = dict.fromkeys(names, 0.0)
        self.originals: dict[str, Callable] = {}

    def __enter__(self) -> SplitTimer:
        for name in self.names:
            fn = getattr(run, name)
            self.originals[name] = fn
            setattr(run, name, self._timed(name, fn))
        return self

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.originals.items():
            setattr(run, name, fn)


class PairedPlain:
    """Wraps ``_forward`` in ``moe_viz.corpus.run``'s namespace: after each batch's forward, the plain
    forward of the same ids, timed apart (its seconds are taken out of the corpus run's)."""

    def __init__(self, model: moe_viz.MoEModel) -> None:
        self.model = model
        self.seconds = 0.0
        self.tokens = 0

    def __enter__(self) -> PairedPlain:
        self.original = run._forward

        def wrapper(model, ids, mask, policy):  # noqa: ANN001, ANN202
            out = self.original(model, ids, mask, policy)
            if model is self.model:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.model(input_ids=ids.to(model.device), use_cache=False)
                self.seconds += time.perf_counter() - t0
                self.tokens += int(mask.sum())
            return out

        run._forward = wrapper
        return self

    def __exit__(self, *exc: object) -> None:
        run._forward = self.original


def throughput(model: moe_viz.MoEModel, repeats: int, warmup_docs: int) -> dict:
    source = open_source(DEMO)
    batches = plain_batches(model, source)
    documents = run.count_documents(source)
    print(
        f"throughput: demo corpus, {documents} documents, {sum(n for _, n in batches)} tokens in "
        f"{len(batches)} batches ({sum(ids.numel() for ids, _ in batches)} with padding)",
        flush=True,
    )
    t0 = time.perf_counter()
    run.run_corpus(model, source, max_documents=warmup_docs)
    print(f"  warm-up corpus ({warmup_docs} documents): {time.perf_counter() - t0:.1f} s", flush=True)
    s, n = plain_forward(model, batches[:3])
    print(f"  warm-up plain (3 batches, {n} tokens): {s:.1f} s", flush=True)

    corpus_tps, plain_tps, splits, paired = [], [], [], []
    cpu: dict[str, list[dict[str, float]]] = {"plain": [], "corpus": []}
    tokens = 0
    for r in range(repeats):
        with SplitTimer(TIMED) as timer:
            before = _usage()
            t0 = time.perf_counter()
            agg = run.run_corpus(model, source)
            total = time.perf_counter() - t0
            cpu["corpus"].append(_delta(before, total))
        tokens = int(agg.total_tokens)
        corpus_tps.append(tokens / total)
        splits.append({**timer.seconds, "other": total - sum(timer.seconds.values()), "total": total})
        before, t0 = _usage(), time.perf_counter()
        s, n = plain_forward(model, batches)
        cpu["plain"].append(_delta(before, time.perf_counter() - t0))
        if n != tokens:
            raise RuntimeError(f"plain batches hold {n} tokens, the corpus run counted {tokens}")
        plain_tps.append(n / s)
        with PairedPlain(model) as pair:
            t0 = time.perf_counter()
            run.run_corpus(model, source)
            corpus_s = time.perf_counter() - t0 - pair.seconds
        paired.append((tokens / corpus_s, pair.tokens / pair.seconds))
        print(
            f"  repeat {r + 1}/{repeats}: corpus {total:.1f} s ({corpus_tps[-1]:.0f} tok/s), "
            f"plain {s:.1f} s ({plain_tps[-1]:.0f} tok/s), ratio {corpus_tps[-1] / plain_tps[-1]:.3f}; "
            f"paired per batch: corpus {corpus_s:.1f} s, plain {pair.seconds:.1f} s, "
            f"ratio {pair.seconds / corpus_s:.3f}; load average {_load():.2f}",
            flush=True,
        )
    split = {k: statistics.median(sp[k] for sp in splits) for k in splits[0]}
    return {
        "documents": documents,
        "tokens": tokens,
        "batches": len(batches),
        "corpus": corpus_tps,
        "plain": plain_tps,
        "paired_corpus": [c for c, _ in paired],
        "paired_plain": [p for _, p in paired],
        "split": split,
        "plain_s": tokens / statistics.median(plain_tps),
        "cpu": {name: {k: statistics.median(d[k] for d in ds) for k in ds[0]} for name, ds in cpu.items()},
    }


# ---- memory -------------------------------------------------------------------------------------


def base_documents(n: int | None) -> list[tuple[str, str]]:
    """(domain, relative file name) of the base corpus: all demo files, or n round-robin over domains."""
    by_domain: dict[str, list[str]] = {}
    for doc in open_source(DEMO).documents():
        domain, _, rest = doc.name.partition("/")
        by_domain.setdefault(domain, []).append(rest)
    files = sorted((d, f) for d, fs in by_domain.items() for f in fs)
    if n is None or n >= len(files):
        return files
    picked: list[tuple[str, str]] = []
    for i in range(max(len(fs) for fs in by_domain.values())):
        for domain, fs in by_domain.items():
            if i < len(fs) and len(picked) < n:
                picked.append((domain, fs[i]))
    return sorted(picked)


def write_corpus(folder: Path, files: list[tuple[str, str]], copies: int) -> None:
    for c in range(copies):
        for domain, name in files:
            target = folder / domain / f"c{c:02d}-{name.replace('/', '_')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text((DEMO / domain / name).read_text(encoding="utf-8"), encoding="utf-8")


def aggregates_bytes(agg) -> int:  # noqa: ANN001 - CorpusAggregates
    """Bytes held by the aggregates' arrays and tables (what grows with the corpus, by design or not)."""
    import numpy as np
    import pandas as pd

    def size(value: object) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, pd.DataFrame):
            return int(value.memory_usage(deep=True).sum())
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    return sum(size(value) for value in vars(agg).values())


def plain_child(corpus: str, result: str) -> None:
    """The plain forwards of a corpus run's batches in this (fresh) process: the forward's own memory."""
    model = moe_viz.load_model()
    load_peak = _peak_kib()
    source = open_source(corpus)
    window = min(run.DEFAULT_WINDOW, model.max_positions or run.DEFAULT_WINDOW)
    chunks = run.chunk_documents(model, source.documents(), window)
    for batch in run.pack_batches(chunks, run.DEFAULT_TOKEN_BUDGET):
        ids, _ = run._padded(model, batch)
        with torch.inference_mode():
            model.model(input_ids=ids.to(model.device), use_cache=False)
    Path(result).write_text(json.dumps({"load_peak_kib": load_peak, "end_peak_kib": _peak_kib()}))


def child(corpus: str, result: str, label: str) -> None:
    """One corpus run in this (fresh) process; writes the numbers to ``result`` as JSON."""
    start_peak, start_hwm = _peak_kib(), _hwm_kib()
    model = moe_viz.load_model()
    load_peak, load_now, load_hwm = _peak_kib(), _current_kib(), _hwm_kib()
    source = open_source(corpus)
    documents = run.count_documents(source)
    step = max(1, documents // 8)
    last = [-step]

    def progress(p: run.Progress) -> None:
        if p.documents_done - last[0] >= step or p.documents_done == documents:
            last[0] = p.documents_done
            print(
                f"    {label}: {p.documents_done}/{documents} documents, {p.tokens_done} tokens, "
                f"{p.elapsed_s:.0f} s, peak RSS {_mib(_peak_kib()):.0f} MiB, load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )

    before = _usage()
    with SplitTimer(TIMED) as timer:
        t0 = time.perf_counter()
        agg = run.run_corpus(model, source, progress=progress)
        seconds = time.perf_counter() - t0
    out = {
        "split": {**timer.seconds, "other": seconds - sum(timer.seconds.values())},
        "cpu": _delta(before, seconds),
        "documents": documents,
        "tokens": int(agg.total_tokens),
        "seconds": seconds,
        "start_peak_kib": start_peak,
        "start_hwm_kib": start_hwm,
        "load_peak_kib": load_peak,
        "load_now_kib": load_now,
        "load_hwm_kib": load_hwm,
        "end_peak_kib": _peak_kib(),
        "end_now_kib": _current_kib(),
        "end_hwm_kib": _hwm_kib(),
        "vocab_rows": int(sum(len(v) for v in agg.vocab.values())),
        "aggregates_bytes": aggregates_bytes(agg),
        "groups": agg.meta.groups,
    }
    Path(result).write_text(json.dumps(out))


def memory(sizes: list[int], base_docs: int | None, threads: int | None, plain: bool = False) -> list[dict]:
    files = base_documents(base_docs)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moe-viz-bench-corpus-") as tmp:
        for size in sizes:
            folder = Path(tmp) / f"x{size}"
            write_corpus(folder, files, size)
            result = Path(tmp) / f"x{size}.json"
            cmd = [sys.executable, __file__, "--child", str(folder), "--result", str(result), "--label", f"{size}x"]
            if threads is not None:
                cmd += ["--threads", str(threads)]
            print(
                f"  memory {size}x: {len(files) * size} documents, fresh process ... (load average {_load():.2f})",
                flush=True,
            )
            subprocess.run(cmd, check=True)
            row = {"size": size, **json.loads(result.read_text())}
            print(
                f"  memory {size}x: {row['tokens']} tokens in {row['seconds']:.0f} s; peak RSS after load "
                f"{_mib(row['load_peak_kib']):.0f} MiB, at the end {_mib(row['end_peak_kib']):.0f} MiB; "
                f"load average {_load():.2f}",
                flush=True,
            )
            if plain:
                cmd[cmd.index("--child")] = "--child-plain"
                print(f"  memory {size}x, plain forwards only: fresh process ...", flush=True)
                subprocess.run(cmd, check=True)
                row["plain"] = json.loads(result.read_text())
                inc = _mib(row["plain"]["end_peak_kib"] - row["plain"]["load_peak_kib"])
                print(f"  memory {size}x, plain forwards only: peak RSS {inc:.0f} MiB over the load", flush=True)
            rows.append(row)
    return rows


# ---- report -------------------------------------------------------------------------------------


def print_throughput(t: dict) -> None:
    corpus, plain = statistics.median(t["corpus"]), statistics.median(t["plain"])
    ratio = corpus / plain
    print(
        f"\n### Throughput: demo corpus, {t['documents']} documents, {t['tokens']} tokens, {t['batches']} batches "
        f"(window {run.DEFAULT_WINDOW}, token budget {run.DEFAULT_TOKEN_BUDGET}); {len(t['corpus'])} rounds\n"
    )
    paired_plain = statistics.median(t["paired_plain"])
    paired_ratio = statistics.median(c / p for c, p in zip(t["paired_corpus"], t["paired_plain"]))
    print("| case | median tok/s | min tok/s | max tok/s | x plain |")
    print("|---|---:|---:|---:|---:|")
    for name, values, unit in (
        ("plain forward, same batches (whole pass)", t["plain"], plain),
        ("run_corpus (whole run)", t["corpus"], plain),
        ("plain forward, paired: after each batch of a run", t["paired_plain"], paired_plain),
        ("run_corpus, paired: that run less the plain forwards", t["paired_corpus"], paired_plain),
    ):
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {min(values):.0f} | {max(values):.0f} | {med / unit:.3f} |")
    best = max(t["corpus"]) / max(t["plain"])
    print(
        f"\ngoal: corpus tokens/s >= {GOAL_RATIO:g}x the plain forward: {ratio:.3f}x of the medians "
        f"({'met' if ratio >= GOAL_RATIO else 'NOT met'}); best round against best round {best:.3f}x; "
        f"paired per batch (robust to other load: both see the same seconds), median of the rounds' ratios "
        f"{paired_ratio:.3f}x ({'met' if paired_ratio >= GOAL_RATIO else 'NOT met'})"
    )
    print("\n| case (median round) | wall s | user s | sys s | minor faults |")
    print("|---|---:|---:|---:|---:|")
    for name, c in t["cpu"].items():
        print(f"| {name} | {c['wall']:.2f} | {c['user']:.2f} | {c['sys']:.2f} | {c['minflt']:.0f} |")
    split = t["split"]
    total = split["total"]
    print(f"\n### Where the corpus run's time goes (median over rounds; plain forward alone {t['plain_s']:.2f} s)\n")
    print("| part | s | % of run |")
    print("|---|---:|---:|")
    for name in (*TIMED, "other"):
        print(f"| {name} | {split[name]:.2f} | {100 * split[name] / total:.1f} |")
    print(f"| total | {total:.2f} | 100.0 |")
    print(
        f"\n_forward beyond the plain forward (recording, token mask): {split['_forward'] - t['plain_s']:+.2f} s; "
        f"everything but _forward: {total - split['_forward']:.2f} s"
    )


def print_memory(rows: list[dict], base_note: str) -> None:
    print(f"\n### Peak memory vs corpus size ({base_note}; one fresh process per size)\n")
    print(
        "| size | documents | tokens | s | tok/s | RSS after load MiB | peak RSS after load MiB "
        "| peak RSS at end MiB | increase over load MiB | increase, VmHWM MiB | RSS at end MiB | vocab rows "
        "| aggregates MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    plain = all("plain" in r for r in rows)
    for r in rows:
        inc = _mib(r["end_peak_kib"] - r["load_peak_kib"])
        now = _mib(r["load_now_kib"]) if r["load_now_kib"] is not None else float("nan")
        hwm = _mib(r["end_hwm_kib"] - r["load_hwm_kib"]) if r["load_hwm_kib"] is not None else float("nan")
        end = _mib(r["end_now_kib"]) if r["end_now_kib"] is not None else float("nan")
        print(
            f"| {r['size']}x | {r['documents']} | {r['tokens']} | {r['seconds']:.0f} | {r['tokens'] / r['seconds']:.0f} "
            f"| {now:.0f} | {_mib(r['load_peak_kib']):.0f} | {_mib(r['end_peak_kib']):.0f} | {inc:.0f} | {hwm:.0f} "
            f"| {end:.0f} | {r['vocab_rows']} | {r['aggregates_bytes'] / 2**20:.1f} |"
        )
    if plain:
        print("\n| size | increase over load MiB: run_corpus | plain forwards of the same batches, alone |")
        print("|---|---:|---:|")
        for r in rows:
            inc = _mib(r["end_peak_kib"] - r["load_peak_kib"])
            alone = _mib(r["plain"]["end_peak_kib"] - r["plain"]["load_peak_kib"])
            print(f"| {r['size']}x | {inc:.0f} | {alone:.0f} |")
    print(
        "\n| size | _forward s | _token_rows s | reduce_batch s | merge s | other s | user s | sys s "
        "| minor faults | forward tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp, c = r["split"], r["cpu"]
        rest = sp["other"] + sp["_padded"] + sp["_layer_routing"] + sp["count_documents"]
        print(
            f"| {r['size']}x | {sp['_forward']:.1f} | {sp['_token_rows']:.1f} | {sp['reduce_batch']:.1f} "
            f"| {sp['merge']:.1f} | {rest:.1f} | {c['user']:.0f} | {c['sys']:.0f} | {c['minflt']:.0f} "
            f"| {r['tokens'] / sp['_forward']:.0f} |"
        )
    floor = max(_mib(r["start_peak_kib"]) for r in rows)
    print(
        f"\npeak RSS = ru_maxrss, which a child inherits from its parent at exec: the children's floor was "
        f"{floor:.0f} MiB, below every load peak"
        if all(r["start_peak_kib"] < r["load_peak_kib"] for r in rows)
        else f"\nWARNING: ru_maxrss inherited from the parent ({floor:.0f} MiB) hides the load peak; trust VmHWM"
    )
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        inc0 = _mib(first["end_peak_kib"] - first["load_peak_kib"])
        inc1 = _mib(last["end_peak_kib"] - last["load_peak_kib"])
        margin = max(FLAT_FRACTION * inc0, FLAT_MIB)
        print(
            f"goal: flat, the increase at {last['size']}x within {margin:.0f} MiB "
            f"(max of {FLAT_FRACTION:.0%} and {FLAT_MIB:.0f} MiB) of the increase at {first['size']}x: "
            f"{inc1:.0f} vs {inc0:.0f} MiB, {inc1 - inc0:+.0f} MiB ({'met' if inc1 - inc0 <= margin else 'NOT met'})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed throughput rounds after the warm-up (default 3)")
    parser.add_argument(
        "--sizes", default="1,4,16", help="corpus sizes for memory, multiples of the base (default 1,4,16)"
    )
    parser.add_argument(
        "--base-docs",
        type=int,
        default=DEFAULT_BASE_DOCS,
        help=f"documents in the 1x memory corpus, round-robin over the domains; 0 = all 84 (default {DEFAULT_BASE_DOCS})",
    )
    parser.add_argument("--warmup-docs", type=int, default=12, help="documents in the warm-up corpus run (default 12)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, sizes 1,4 (a fast check)")
    parser.add_argument("--skip-throughput", action="store_true", help="memory only")
    parser.add_argument(
        "--memory-plain",
        action="store_true",
        help="per size, also a fresh process running only the plain forwards of the same batches",
    )
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-plain", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child(args.child, args.result, args.label)
        return
    if args.child_plain is not None:
        plain_child(args.child_plain, args.result)
        return
    if args.quick:
        args.repeats, args.sizes = 1, "1,4"
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    base_docs = args.base_docs or None
    n_base = len(base_documents(base_docs))
    base_note = (
        f"base = the demo corpus, {n_base} documents"
        if base_docs is None or n_base == len(base_documents(None))
        else f"base = {n_base} of the 84 demo documents, round-robin over the 7 domains"
    )

    started = time.perf_counter()
    print(machine_line(), flush=True)
    print(f"load average now: {_load():.2f}", flush=True)
    print(f"model: {moe_viz.DEFAULT_MODEL}", flush=True)
    rows = None
    if not args.skip_memory:  # first: the children inherit this process's ru_maxrss, small before a model load
        print(f"memory: sizes {sizes} x ({base_note})", flush=True)
        rows = memory(sizes, base_docs, args.threads, args.memory_plain)
    result_t = None
    if not args.skip_throughput:
        print("loading the default model ...", flush=True)
        model = moe_viz.load_model()
        print(
            f"model loaded: {len(model.sites)} MoE layers x {model.num_experts} experts, device {model.device}, "
            f"dtype {next(model.model.parameters()).dtype}",
            flush=True,
        )
        result_t = throughput(model, args.repeats, args.warmup_docs)

    print(f"\n## bench/corpus.py ({time.perf_counter() - started:.0f} s)\n")
    print(machine_line())
    _load()
    print(
        f"1-minute load average at the steps: {min(LOADS):.2f} .. {max(LOADS):.2f} "
        f"(on {os.cpu_count()} CPUs; this bench accounts for ~{torch.get_num_threads()}: more means other processes "
        "competed for the CPUs and the times are noisy)"
    )
    print(f"model: {moe_viz.DEFAULT_MODEL}")
    if result_t is not None:
        print_throughput(result_t)
    if rows is not None:
        print_memory(rows, base_note)


if __name__ == "__main__":
    main()
