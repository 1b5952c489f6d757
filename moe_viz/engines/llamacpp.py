"""llama.cpp's moe-trace CSV: one ``layer,expert`` row per routed assignment.

Not merged in llama.cpp: checked against the open pull request ggml-org/llama.cpp #28544
("examples : add moe-trace to log MoE expert routing decisions", opened 2026-09-07), whose
``examples/moe-trace/moe-trace.cpp`` writes to ``$MOE_TRACE_OUT`` (default ``moe_trace.csv``):
no header, ``fprintf("%d,%d\\n", layer, expert)`` for every value of each ``ffn_moe_topk-<layer>``
tensor, in callback order: per micro-batch (ubatch), per MoE layer, token-major, the token's k
experts in the top-k argsort's order (highest score first). No token index, no ubatch index.

So the file is a sequence of blocks of rows with one layer each; a block of one ubatch and layer
holds ``tokens × k`` rows, and a new ubatch starts where the first MoE layer comes back. With k
(the model's top-k, ``--top-k``, or else the smallest block: a decode step routes one token)
tokens are recovered in order, prompt then generated, and the file becomes one trace and counts
per ubatch. Caveat from the pull request's review: the tracer reads the top-k view as contiguous,
so prompt rows after the first token of each ubatch may hold wrong ids; decode rows are right.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import Format, Imported
from .routed import ModelShape, RoutedExperts, counts_to_aggregates, to_trace

ENGINE = "llama.cpp"
PREFILL_CAVEAT = (
    "the pull request's tracer may mis-read prompt rows after the first token of each ubatch (a strided top-k view "
    "read as contiguous); decode rows are exact"
)


def read_rows(path: Path) -> np.ndarray:
    """(N, 2) int64 ``layer, expert`` rows; ValueError naming the first bad line."""
    if path.is_dir():
        raise ValueError("a llama.cpp moe-trace is one .csv file, not a folder")
    rows = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"{path.name} line {number} is not 'layer,expert' integers: {line[:60]!r}")
            layer, expert = int(parts[0]), int(parts[1])
            if layer < 0 or expert < 0:
                raise ValueError(f"{path.name} line {number}: negative layer or expert ({line[:60]!r})")
            rows.append((layer, expert))
    if not rows:
        raise ValueError(f"{path.name} holds no 'layer,expert' row")
    return np.asarray(rows, dtype=np.int64)


def blocks(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(layer, start, stop) runs of consecutive rows with one layer."""
    change = np.nonzero(np.diff(rows[:, 0]))[0] + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(rows)]])
    return [(int(rows[a, 0]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _repeats(rows: np.ndarray, runs: list[tuple[int, int, int]], k: int) -> bool:
    """True when cutting the rows into tokens of k experts lists an expert twice for a token."""
    for _, a, b in runs:
        tokens = np.sort(rows[a:b, 1].reshape(-1, k), axis=1)  # (tokens, k)
        if (tokens[:, 1:] == tokens[:, :-1]).any():
            return True
    return False


def read(path: Path, shape: ModelShape, token_ids: list[int] | None = None) -> Imported:
    """The moe-trace file as one trace (tokens in order) and counts per ubatch."""
    rows = read_rows(path)
    runs = blocks(rows)
    layers = sorted({layer for layer, _, _ in runs})
    notes = [PREFILL_CAVEAT]
    k = shape.top_k
    if k is None:
        k = math.gcd(*[b - a for _, a, b in runs])
        if _repeats(rows, runs, k):  # no decode step: the blocks do not tell k
            raise ValueError(
                "the file does not tell how many experts each token took (no decode step): name the model or give "
                "top_k (--top-k)"
            )
        notes.append(
            f"top-k {k} inferred from the block sizes (a decode step routes one token); name the model to set it"
        )
    ubatches: list[dict[int, np.ndarray]] = []
    for layer, a, b in runs:
        if (b - a) % k:
            raise ValueError(f"a block of layer {layer} holds {b - a} rows, not a whole number of tokens × top-{k}")
        if not ubatches or layer in ubatches[-1]:
            ubatches.append({})
        ubatches[-1][layer] = rows[a:b, 1].reshape(-1, k)  # (tokens, k)
    for i, ub in enumerate(ubatches):
        if sorted(ub) != layers:
            raise ValueError(f"ubatch {i} holds layers {sorted(ub)}, the file {layers}: a truncated file?")
        if len({v.shape[0] for v in ub.values()}) != 1:
            raise ValueError(f"ubatch {i}: its layers route different numbers of tokens")
    ids = np.concatenate([np.stack([ub[layer] for layer in layers], axis=1) for ub in ubatches])  # (T, L, k)
    routed = RoutedExperts(f"{ENGINE} moe-trace", ids, tuple(layers), token_ids=token_ids, notes=tuple(notes))
    trace = to_trace(routed, replace(shape, num_layers=None, top_k=k))
    E = trace.layers[0].num_experts
    counts = np.zeros((len(ubatches), max(layers) + 1, E), np.int64)  # (ubatches, layers, E)
    for i, ub in enumerate(ubatches):
        for layer, experts in ub.items():
            np.add.at(counts[i, layer], experts.reshape(-1), 1)
    agg = counts_to_aggregates(
        counts, tuple(range(max(layers) + 1)), engine=f"{ENGINE} moe-trace {path.name}", shape=replace(shape, top_k=k)
    )
    label = f"{path.name}: {len(ubatches)} ubatches"
    return Imported("llamacpp", traces=[(label, trace)], counts=agg, notes=tuple(notes))


FORMAT = Format(
    name="llamacpp",
    engine=ENGINE,
    label="llama.cpp moe-trace (layer,expert CSV)",
    suffixes=(".csv",),
    read=read,
)
