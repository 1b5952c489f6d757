"""Megatron-LM's router trace (``--moe-routing-trace-path DIR``), with the optional logits sidecar.

Checked against NVIDIA/Megatron-LM ``megatron/core/transformer/moe/router_trace.py`` at commit
``d98e8a64ddf3`` (2026-08-22; merged in PR #5220, first tagged in ``core_v0.19.0``).

``router_trace_rank{r}.jsonl``: one JSON object per (step, block, layer) and rank:
``{step, stage: "pre_dispatch", block: "decoder" | "mtp", layer, rank, num_tokens, topk,
top_indices: [[...] * topk] * num_tokens}``, optionally ``mtp_idx`` and, with
``--moe-routing-trace-capture-logits``, ``logit_offset``, ``logit_bytes``, ``logit_shape`` into
``logits_rank{r}.bin``: the router's raw logits (before softmax or sigmoid), bfloat16, native
little-endian, no header, ``(num_tokens, num_experts)``. ``router_state_rank{r}.pt`` (with
``--moe-routing-trace-dump-weights``) names each router's ``score_function``.

Quirks handled: ``top_indices`` rows come from the routing map's ``nonzero()`` and so list each
token's experts **by expert id, not by score**: without logits there is no first choice (the views
that need one say so); with logits the slots are re-ordered by score. Megatron **skips** a layer's
record when the chosen count is not tokens × top-k (token dropping): such steps are counted, but
make no trace. ``layer`` is the index inside the model chunk (under pipeline parallelism, per
stage). No token ids are recorded: give them for a single sequence. Per-rank files (data
parallelism: each rank its own tokens) are read from the folder together.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import Format, Imported
from .routed import ModelShape, RoutedExperts, counts_to_aggregates, to_trace

ENGINE = "Megatron-LM"
TRACE_FILE = re.compile(r"router_trace_rank(\d+)\.jsonl$")
RECORD_KEYS = ("step", "block", "layer", "rank", "num_tokens", "topk", "top_indices")


def _trace_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if TRACE_FILE.search(p.name))
        if not files:
            raise ValueError(f"{path} holds no router_trace_rank*.jsonl file")
        return files
    return [path]


def _records(file: Path) -> list[dict[str, Any]]:
    records = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{file.name} line {number} is not JSON (a truncated file?)") from None
            missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"{file.name} line {number} is not a router-trace record: no {', '.join(missing)}")
            ids = np.asarray(record["top_indices"])
            if ids.dtype.kind not in "iu" or ids.shape != (record["num_tokens"], record["topk"]):
                raise ValueError(
                    f"{file.name} line {number}: top_indices has shape {ids.shape}, expected num_tokens × topk = "
                    f"{(record['num_tokens'], record['topk'])}"
                )
            record["top_indices"] = ids.astype(np.int64)
            records.append(record)
    if not records:
        raise ValueError(f"{file.name} holds no record")
    return records


def read_logits(folder: Path, record: dict[str, Any]) -> np.ndarray:
    """(num_tokens, num_experts) float32 logits of one record from ``logits_rank{rank}.bin``."""
    path = folder / f"logits_rank{record['rank']}.bin"
    if not path.is_file():
        raise ValueError(f"the trace points into {path.name}, which is not beside it")
    shape = tuple(int(n) for n in record["logit_shape"])
    nbytes = int(record["logit_bytes"])
    if len(shape) != 2 or shape[0] != record["num_tokens"] or nbytes != 2 * shape[0] * shape[1]:
        raise ValueError(
            f"logit_shape {shape} and logit_bytes {nbytes} do not fit {record['num_tokens']} tokens in bf16"
        )
    with path.open("rb") as handle:
        handle.seek(int(record["logit_offset"]))
        data = handle.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{path.name} ends before the record's logits (truncated)")
    bf16 = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16  # bfloat16 is float32's top half
    return bf16.view(np.float32).reshape(shape)


def _score_function(folder: Path, rank: int) -> str | None:
    """The routers' score function from ``router_state_rank{rank}.pt``, when it was dumped."""
    path = folder / f"router_state_rank{rank}.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable state only costs the score function
        return None
    names = (
        {v.get("score_function") for v in state.values() if isinstance(v, dict)} if isinstance(state, dict) else set()
    )
    return names.pop() if len(names) == 1 else None


def _sequence(
    records: list[dict[str, Any]], folder: Path, score_function: str | None, shape: ModelShape, label: str
) -> tuple[str, Any]:
    """One micro-batch: the records of every layer, in layer order."""
    records = sorted(records, key=lambda r: r["layer"])
    sizes = {r["num_tokens"] for r in records}
    if len(sizes) != 1:
        raise ValueError(f"{label}: the layers hold different token counts {sorted(sizes)}")
    ks = {r["topk"] for r in records}
    if len(ks) != 1:
        raise ValueError(f"{label}: the layers route different top-k {sorted(ks)}")
    ids = np.stack([r["top_indices"] for r in records], axis=1)  # (T, L, k)
    with_logits = all("logit_offset" in r for r in records)
    logits = np.stack([read_logits(folder, r) for r in records], axis=1) if with_logits else None  # (T, L, E)
    notes = []
    if with_logits and score_function is None:
        score_function = "softmax"
        notes.append("score function not dumped (router_state_rank*.pt): softmax assumed")
    if not with_logits:
        notes.append("experts listed by id, not by score (no logits sidecar): no first choice")
    routed = RoutedExperts(
        f"{ENGINE} router trace",
        ids,
        tuple(int(r["layer"]) for r in records),
        logits=logits,
        ranked=False,
        score_function=score_function or "softmax",
        notes=tuple(notes),
    )
    return label, routed


def read(path: Path, shape: ModelShape, token_ids: list[int] | None = None) -> Imported:
    """Every micro-batch of a router trace (a ``.jsonl`` file, or the folder of per-rank files)."""
    files = _trace_files(path)
    folder = files[0].parent
    groups: dict[tuple, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    mtp = 0
    for file in files:
        for record in _records(file):
            if record["block"] != "decoder":
                mtp += 1
                continue
            groups[(int(record["rank"]), int(record["step"]))][int(record["layer"])].append(record)
    if not groups:
        raise ValueError("the trace holds no decoder-layer record (only multi-token-prediction blocks)")
    notes, sequences, steps = [], [], []
    skipped = []
    every = [r for by_layer in groups.values() for rs in by_layer.values() for r in rs]
    k = shape.top_k or int(every[0]["topk"])
    E = shape.num_experts or max(int(r["top_indices"].max()) for r in every if r["top_indices"].size) + 1
    width = max(int(r["layer"]) for r in every) + 1
    all_layers = {int(r["layer"]) for r in every}
    for (rank, step), by_layer in sorted(groups.items()):
        first = next(iter(by_layer.values()))
        count = np.zeros((width, E), np.int64)
        for layer, rs in by_layer.items():
            for r in rs:
                if r["top_indices"].size and r["top_indices"].max() >= E:
                    raise ValueError(f"rank {rank} step {step} layer {layer} routes to expert {r['top_indices'].max()}")
                np.add.at(count[layer], r["top_indices"].reshape(-1), 1)
        steps.append(count)
        micro = {len(rs) for rs in by_layer.values()}
        if len(micro) != 1 or set(by_layer) != all_layers:  # Megatron left out some layer records (token dropping)
            skipped.append(f"{rank}/{step}")
            continue
        score = _score_function(folder, rank)
        for m in range(micro.pop()):
            label = f"rank {rank}, step {step}" + (f", micro-batch {m}" if len(first) > 1 else "")
            sequences.append(_sequence([rs[m] for rs in by_layer.values()], folder, score, shape, label))
    if mtp:
        notes.append(f"{mtp} multi-token-prediction records left out (decoder layers only)")
    if skipped:
        notes.append(
            f"{len(skipped)} rank/step groups count but make no trace: Megatron skipped some of their layer records "
            f"(token dropping): {', '.join(skipped[:5])}" + (" …" if len(skipped) > 5 else "")
        )
    attach = token_ids if len(sequences) == 1 else None
    traces = [(label, to_trace(replace(r, token_ids=attach), shape)) for label, r in sequences]
    stacked = np.stack(steps)  # (rank-steps, layers, E)
    counts = counts_to_aggregates(
        stacked,
        tuple(range(width)),
        engine=f"{ENGINE} router trace ({len(files)} rank files)",
        shape=replace(shape, top_k=k),
    )
    return Imported("megatron", traces=traces, counts=counts, notes=tuple(notes))


FORMAT = Format(
    name="megatron",
    engine=ENGINE,
    label="Megatron-LM router trace (router_trace_rank*.jsonl, + logits_rank*.bin)",
    suffixes=(".jsonl", ".bin", ".pt"),
    read=read,
    per_rank_files=True,
)
