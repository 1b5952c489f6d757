"""SGLang: a request's ``routed_experts``, and the expert-distribution recorder's dumps.

Checked against the released SGLang wheel 0.5.23 (``srt/state_capturer/routed_experts.py``,
``srt/managers/detokenizer_manager.py``, ``srt/entrypoints/openai/protocol.py``,
``srt/eplb/expert_distribution.py``).

**Per request** (``--enable-return-routed-experts``, request field ``return_routed_experts``):
``meta_info["routed_experts"]`` is base64 of raw little-endian int32, no header, flattened from
``(seq_len - 1 - routed_experts_start_len, num_hidden_layers, top_k)``: the last token is never
routed, dense layers are zero-filled, ids are *logical* experts (captured before the
logical-to-physical map). The OpenAI endpoints carry it at response level under
``sglext.routed_experts`` (the first choice only). The flat buffer needs the model's layers and
top-k to be reshaped: name the model.

**Recorder dumps** (``--expert-distribution-recorder-mode``), written with ``torch.save``:
- ``stat`` / ``stat_approx``: ``expert_distribution_recorder_{time}.pt`` =
  ``{rank, logical_count: int32 (steps, layers, logical experts), average_utilization_rate_over_window}``
  (already summed over ranks): counts.
- ``per_pass`` / ``per_token``: one ``expert_distribution_recorder_{time}_{rank}.pt`` per rank =
  ``{records: [...], last_physical_to_logical_map: (layers, physical experts)}``; each record has
  ``forward_pass_id``, ``rank``, ``gatherer_key``, ``global_physical_count`` (layers, physical
  experts: this rank's tokens, indexed by physical slot). ``per_token`` records add ``input_ids``,
  ``positions``, ``extend_seq_lens``, ``forward_mode`` and ``topk_ids_of_layer`` int32
  (layers, tokens, 8), reset to -1 before every pass, holding *physical* ids.
  Physical slots (expert-parallel replicas) are mapped back to logical experts with the map; the
  ranks' counts of one pass are summed. Extend (prefill) passes become one trace per sequence;
  decode passes interleave many requests one token each, so they count but make no trace.

Tensors are stored on the GPU: they are loaded with ``torch.load(..., map_location="cpu",
weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import Format, Imported
from .routed import ModelShape, RoutedExperts, counts_to_aggregates, to_trace

ENGINE = "SGLang"


# ----------------------------------------------------------------------------- per request
def decode_routed_experts(text: str, num_layers: int, top_k: int, what: str = "routed_experts") -> np.ndarray:
    """SGLang's base64 int32 buffer as (tokens, num_layers, top_k)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None
    if len(data) % 4:
        raise ValueError(f"{what} holds {len(data)} bytes, not a whole number of int32 values (truncated?)")
    flat = np.frombuffer(data, dtype="<i4")
    per_token = num_layers * top_k
    if flat.size == 0 or flat.size % per_token:
        raise ValueError(
            f"{what} holds {flat.size} ids, not a whole number of tokens × {num_layers} layers × top-{top_k}: "
            "truncated, or another model"
        )
    return flat.reshape(-1, num_layers, top_k).astype(np.int64)


def _answers(data: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, the object holding routed_experts) for a /generate answer (one or a batch) or an
    OpenAI answer (``sglext``)."""
    if isinstance(data, list):
        return [(f"request {i}", item) for i, item in enumerate(data) if isinstance(item, dict)]
    if isinstance(data, dict):
        return [("request", data)]
    raise ValueError("the JSON is not an SGLang answer (an object, or a list of them)")


def _routed_field(answer: dict[str, Any], label: str) -> str:
    for holder in (answer.get("meta_info"), answer.get("sglext"), answer):
        if isinstance(holder, dict) and isinstance(holder.get("routed_experts"), str):
            return holder["routed_experts"]
    raise ValueError(
        f"{label} has no routed_experts in meta_info or sglext: start the server with "
        "--enable-return-routed-experts and send return_routed_experts: true"
    )


def _answer_token_ids(answer: dict[str, Any]) -> list[int] | None:
    prompt = answer.get("input_ids") or answer.get("prompt_token_ids")
    output = answer.get("output_ids")
    if isinstance(prompt, list) and isinstance(output, list):
        return [*prompt, *output]
    return None


def read(path: Path, shape: ModelShape, token_ids: list[int] | None = None) -> Imported:
    """Every request of an SGLang answer saved as JSON."""
    if shape.num_layers is None or shape.top_k is None:
        raise ValueError(
            "SGLang's routed_experts is a flat buffer: name the model so it can be cut into layers and top-k"
        )
    if path.is_dir():
        raise ValueError("an SGLang answer is one .json file, not a folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} is not JSON ({err.__class__.__name__})") from None
    traces = []
    for label, answer in _answers(data):
        ids = decode_routed_experts(
            _routed_field(answer, label), shape.num_layers, shape.top_k, f"{label} routed_experts"
        )
        tokens = _answer_token_ids(answer) or token_ids
        routed = RoutedExperts(f"{ENGINE} routed_experts", ids, tuple(range(shape.num_layers)), token_ids=tokens)
        traces.append((label, to_trace(routed, shape)))
    return Imported("sglang", traces)


# ----------------------------------------------------------------------------- recorder dumps
def load_dump(path: Path) -> dict[str, Any]:
    """A recorder ``.pt`` file, unpickled safely: tensors and plain containers only."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types; all mean "not a safe dump"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's message holds terminal colour codes
        found = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?(\S+)", text, re.IGNORECASE)  # name it, not torch's advice
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        if found:
            first = f"it holds a pickled Python object ({found.group(1)}), which is never unpickled"
        elif detail:
            first = detail.group(1)[:160]
        else:
            first = text.splitlines()[0][:160] if text else type(err).__name__
        raise ValueError(
            f"{path.name} is not a recorder dump moe-viz can load safely (weights_only): {first}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a {type(data).__name__}, not a recorder dump (a dict)")
    return data


def _tensor(value: Any, what: str, ndim: int) -> np.ndarray:
    if not isinstance(value, torch.Tensor) or value.dim() != ndim or value.dtype.is_floating_point:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{what} must be an integer tensor with {ndim} axes; got {got}")
    return value.numpy().astype(np.int64)


def _dump_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no .pt recorder dump")
    return files


def _logical(physical: np.ndarray, mapping: np.ndarray, what: str) -> np.ndarray:
    """Physical expert ids (-1 = empty) of (layers, ...) as logical ids through (layers, physical)."""
    L, P = mapping.shape
    if physical.shape[0] != L:
        raise ValueError(f"{what} has {physical.shape[0]} layers, the physical-to-logical map {L}")
    if physical.size and physical.max() >= P:
        raise ValueError(f"{what} names physical slot {int(physical.max())}, the map has {P}")
    layer = np.arange(L).reshape(L, *([1] * (physical.ndim - 1)))
    return np.where(physical >= 0, mapping[layer, np.clip(physical, 0, None)], -1)


def _logical_counts(count: np.ndarray, mapping: np.ndarray, E: int, what: str) -> np.ndarray:
    """(layers, physical) counts summed into (layers, E) logical experts."""
    L, P = mapping.shape
    if count.shape != (L, P):
        raise ValueError(f"{what} has shape {count.shape}, expected (layers, physical experts) = {(L, P)}")
    out = np.zeros((L, E), np.int64)
    np.add.at(out, (np.repeat(np.arange(L), P), mapping.reshape(-1)), count.reshape(-1))
    return out


def _stat(files: list[Path], dumps: list[dict[str, Any]], shape: ModelShape) -> Imported:
    if len(dumps) != 1:
        raise ValueError("stat dumps are written by rank 0 alone, already summed over ranks: import one file")
    counts = _tensor(dumps[0]["logical_count"], "logical_count", 3)  # (steps, L, E)
    layers = tuple(range(counts.shape[1]))
    agg = counts_to_aggregates(counts, layers, engine=f"{ENGINE} recorder (stat) {files[0].name}", shape=shape)
    return Imported("sglang-dump", counts=agg)


def _records(files: list[Path], dumps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    records, maps = [], []
    for file, dump in zip(files, dumps, strict=True):
        if not isinstance(dump.get("records"), list):
            raise ValueError(f"{file.name} has no records list (not a per_pass / per_token dump)")
        maps.append(_tensor(dump.get("last_physical_to_logical_map"), f"{file.name} last_physical_to_logical_map", 2))
        for record in dump["records"]:
            if not isinstance(record, dict) or "forward_pass_id" not in record:
                raise ValueError(f"{file.name} holds a record without forward_pass_id")
            records.append(record)
    if any(m.shape != maps[0].shape or not np.array_equal(m, maps[0]) for m in maps):
        raise ValueError("the ranks' physical-to-logical maps differ: these files come from different runs")
    return records, maps[0]


def _detail(files: list[Path], dumps: list[dict[str, Any]], shape: ModelShape) -> Imported:
    records, mapping = _records(files, dumps)
    E = shape.num_experts or int(mapping.max()) + 1
    if mapping.max() >= E:
        raise ValueError(f"the physical-to-logical map names logical expert {int(mapping.max())}; the model has {E}")
    passes: dict[int, np.ndarray] = {}
    traces = []
    for record in sorted(records, key=lambda r: (int(r["forward_pass_id"]), int(r.get("rank", 0)))):
        pass_id = int(record["forward_pass_id"])
        what = f"pass {pass_id} rank {record.get('rank', '?')}"
        count = _logical_counts(
            _tensor(record["global_physical_count"], f"{what} global_physical_count", 2), mapping, E, what
        )
        passes[pass_id] = passes.get(pass_id, 0) + count  # the ranks' tokens of one pass add up
        if "topk_ids_of_layer" in record and record.get("extend_seq_lens"):
            traces.extend(_extend_traces(record, mapping, shape, what))
    notes = (
        "physical slots mapped to logical experts with the dump's last map (an expert-parallel rebalance "
        "during the recording would blur earlier passes)",
    )
    steps = np.stack([passes[p] for p in sorted(passes)])  # (passes, L, E)
    agg = counts_to_aggregates(
        steps,
        tuple(range(steps.shape[1])),
        engine=f"{ENGINE} recorder ({len(files)} rank files)",
        shape=shape,
        notes=notes,
    )
    return Imported("sglang-dump", traces=traces, counts=agg, notes=notes)


def _extend_traces(record: dict[str, Any], mapping: np.ndarray, shape: ModelShape, what: str) -> list:
    """One trace per sequence of an extend (prefill) pass of a per_token record."""
    topk = _tensor(record["topk_ids_of_layer"], f"{what} topk_ids_of_layer", 3)  # (L, N, 8) physical, -1 = empty
    ids = np.asarray(record.get("input_ids", []), dtype=np.int64)
    lengths = [int(n) for n in record["extend_seq_lens"]]
    if sum(lengths) > topk.shape[1] or (ids.size and ids.size < sum(lengths)):
        raise ValueError(f"{what}: extend_seq_lens add up to {sum(lengths)} tokens, more than the record holds")
    logical = _logical(topk, mapping, what).transpose(1, 0, 2)  # (N, L, 8)
    written = (logical >= 0).any(axis=(0, 2))  # (L,) layers the pass wrote: dense layers stay -1
    layers = tuple(int(i) for i in np.nonzero(written)[0])
    traces, start = [], 0
    for j, n in enumerate(lengths):
        part = logical[start : start + n][:, list(layers), :]
        tokens = ids[start : start + n].tolist() if ids.size else None
        start += n
        routed = RoutedExperts(f"{ENGINE} recorder (per_token) {what}", part, layers, token_ids=tokens)
        traces.append((f"{what}, sequence {j}", to_trace(routed, _without_layer_count(shape))))
    return traces


def _without_layer_count(shape: ModelShape) -> ModelShape:
    """The recorder's rows name their layers themselves (dense layers are left out)."""
    return replace(shape, num_layers=None)


def read_dump(path: Path, shape: ModelShape, token_ids: list[int] | None = None) -> Imported:
    """A recorder dump (one file, or a folder of per-rank files); token ids come from the dump."""
    files = _dump_files(path)
    dumps = [load_dump(f) for f in files]
    if all("logical_count" in d for d in dumps):
        return _stat(files, dumps, shape)
    if all("records" in d for d in dumps):
        return _detail(files, dumps, shape)
    raise ValueError(
        "not an SGLang expert-distribution dump: expected 'logical_count' (stat mode) or 'records' "
        "(per_pass / per_token mode) in every file"
    )


FORMAT = Format(
    name="sglang",
    engine=ENGINE,
    label="SGLang routed_experts (a JSON answer)",
    suffixes=(".json",),
    read=read,
)
DUMP_FORMAT = Format(
    name="sglang-dump",
    engine=ENGINE,
    label="SGLang expert-distribution dump (.pt: stat, per_pass, per_token)",
    suffixes=(".pt",),
    read=read_dump,
    takes_token_ids=False,
    per_rank_files=True,
)
