"""Trace file formats: a ``Trace`` to and from JSON (text or a file), Parquet (a file) and pandas frames.

Schema ``moe-viz/trace`` version 1 (JSON; Parquet stores the same content, see ``save_parquet``):

```
{"schema": "moe-viz/trace", "schema_version": 1,
 "meta": {model_id, architecture, policy, device, dtype, prompt, generated_text, timings_ms, source},
 "tokens": {"ids": [T], "text": [T], "step": [T]},      # step 0 = prompt (prefill), s = decode step s
 "layers": [{"layer", "num_experts", "top_k", "capture_only", "capacity": [steps] | null,
             "router_family", "selection_bias", "group_limited", "shared_expert",  # optional
             "held_native", "scores_recorded", "ranked",                            # optional
             "router_logits": [T][E], "router_probs": [T][E],
             "native_index": [T][k], "native_weights": [T][k],
             "index": [T][k'], "weights": [T][k'], "dropped": [T][k']}],
 "output": {"top_ids": [T][K], "top_logprobs": [T][K], "top_tokens": [T][K],
            "target_logprob": [T] (null where there is no next token), "entropy": [T] (null: none),
            "vocab_logprobs": [T][V] | null}}
```
An engine import (``scores_recorded`` false) writes ``router_logits``, ``router_probs``,
``native_weights`` and ``weights`` as null (they read back as NaN), and empty predictions.
The full next-token distribution (``vocab_logprobs``) is exported only on request
(``include_vocab=True``). Text and paths have separate functions: ``to_json_text`` /
``from_json_text`` and ``save_json`` / ``load_json``; ``save_parquet`` / ``load_parquet``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .trace import LayerTrace, OutputTrace, Trace

SCHEMA = "moe-viz/trace"
SCHEMA_VERSION = 1


def to_frames(trace: Trace) -> dict[str, pd.DataFrame]:
    """DataFrames: ``tokens``, ``routing`` (one row per assignment), ``probs`` (one row per
    token and layer, one column per expert), ``predictions`` (top-K per position)."""
    tokens = pd.DataFrame(
        {"position": range(trace.num_tokens), "token_id": trace.token_ids, "token": trace.tokens, "step": trace.step}
    )
    routing_parts, prob_parts = [], []
    for lt in trace.layers:
        T, kk = lt.index.shape
        routing_parts.append(
            pd.DataFrame(
                {
                    "layer": lt.layer,
                    "position": torch.arange(T).repeat_interleave(kk).numpy(),
                    "slot": torch.arange(kk).repeat(T).numpy(),
                    "expert": lt.index.reshape(-1).numpy(),
                    "weight": lt.weights.reshape(-1).numpy(),
                    "dropped": lt.dropped.reshape(-1).numpy(),
                }
            )
        )
        probs = pd.DataFrame(lt.router_probs.numpy(), columns=[f"expert_{e}" for e in range(lt.num_experts)])
        probs.insert(0, "position", range(T))
        probs.insert(0, "layer", lt.layer)
        prob_parts.append(probs)
    K = trace.output.top_ids.shape[1]
    predictions = pd.DataFrame(
        {
            "position": torch.arange(trace.num_tokens).repeat_interleave(K).numpy(),
            "rank": torch.arange(K).repeat(trace.num_tokens).numpy(),
            "token_id": trace.output.top_ids.reshape(-1).numpy(),
            "token": [t for row in trace.output.top_tokens for t in row],
            "prob": trace.output.top_logprobs.reshape(-1).exp().numpy(),
        }
    )
    return {
        "tokens": tokens,
        "routing": pd.concat(routing_parts, ignore_index=True),
        "probs": pd.concat(prob_parts, ignore_index=True),
        "predictions": predictions,
    }


# ----------------------------------------------------------------------------- dict / JSON
def to_dict(trace: Trace, include_vocab: bool = False) -> dict[str, Any]:
    """The schema-1 dict (see the module docstring)."""
    out = trace.output
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "model_id": trace.model_id,
            "architecture": trace.architecture,
            "policy": trace.policy,
            "device": trace.device,
            "dtype": trace.dtype,
            "prompt": trace.prompt,
            "generated_text": trace.generated_text,
            "timings_ms": trace.timings_ms,
            "source": trace.source,
        },
        "tokens": {"ids": trace.token_ids, "text": trace.tokens, "step": trace.step},
        "layers": [
            {
                "layer": lt.layer,
                "num_experts": lt.num_experts,
                "top_k": lt.top_k,
                "capture_only": lt.capture_only,
                **{name: getattr(lt, name) for name in _ROUTER_FACTS},
                "capacity": lt.capacity,
                **{name: _array_or_null(lt, name) for name in _LAYER_ARRAYS},
            }
            for lt in trace.layers
        ],
        "output": {
            "top_ids": out.top_ids.tolist(),
            "top_logprobs": out.top_logprobs.tolist(),
            "top_tokens": out.top_tokens,
            "target_logprob": [None if math.isnan(v) else v for v in out.target_logprob.tolist()],
            "entropy": [None if math.isnan(v) else v for v in out.entropy.tolist()],
            "vocab_logprobs": out.vocab_logprobs.tolist() if include_vocab and out.has_distribution else None,
        },
    }


def from_dict(data: dict[str, Any]) -> Trace:
    """Rebuild a trace from ``to_dict`` output; ValueError on a foreign or newer schema, and on a
    malformed one (missing fields, arrays of the wrong shape, expert ids out of range): a trace
    file may come from anywhere, and a bad one must not crash what reads it later."""
    try:
        trace = _from_dict(data)
    except (KeyError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        raise ValueError(
            f"not a valid moe-viz trace: missing or malformed field ({type(err).__name__}: {err})"
        ) from None
    _check_consistent(trace)
    return trace


def _check_consistent(trace: Trace) -> None:
    T = trace.num_tokens
    if len(trace.tokens) != T or len(trace.step) != T:
        raise ValueError(f"not a valid moe-viz trace: {T} token ids but {len(trace.tokens)} token texts")
    for lt in trace.layers:
        E = lt.num_experts
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise ValueError(f"not a valid moe-viz trace: layer {lt.layer} has num_experts {E!r}")
        for name in ("router_logits", "router_probs"):
            if tuple(getattr(lt, name).shape) != (T, E):
                raise ValueError(f"not a valid moe-viz trace: layer {lt.layer} {name} is not ({T}, {E})")
        shapes = {tuple(getattr(lt, name).shape) for name in ("index", "weights", "dropped")}
        native = {tuple(lt.native_index.shape), tuple(lt.native_weights.shape)}
        if len(shapes) != 1 or len(native) != 1 or next(iter(shapes))[:1] != (T,) or next(iter(native))[:1] != (T,):
            raise ValueError(f"not a valid moe-viz trace: layer {lt.layer} routing arrays are not (T={T}, k)")
        for name in ("index", "native_index"):
            ids = getattr(lt, name)
            if ids.dim() != 2 or (ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < E)):
                raise ValueError(
                    f"not a valid moe-viz trace: layer {lt.layer} {name} has expert ids outside 0..{E - 1}"
                )


def _from_dict(data: dict[str, Any]) -> Trace:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"not a moe-viz trace: schema is {schema!r}, expected {SCHEMA!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"trace schema_version {data.get('schema_version')!r} is not supported (expected 1)")
    meta, out = data["meta"], data["output"]
    layers = [
        LayerTrace(
            layer=item["layer"],
            num_experts=item["num_experts"],
            top_k=item["top_k"],
            capture_only=item["capture_only"],
            **{name: item.get(name, default) for name, default in _ROUTER_FACTS.items()},
            capacity=item["capacity"],
            **{name: _layer_array(item, name, len(data["tokens"]["ids"])) for name in _LAYER_ARRAYS},
        )
        for item in data["layers"]
    ]
    vocab = out.get("vocab_logprobs")
    output = OutputTrace(
        top_ids=torch.tensor(out["top_ids"], dtype=torch.long),
        top_logprobs=torch.tensor(out["top_logprobs"], dtype=torch.float32),
        top_tokens=out["top_tokens"],
        target_logprob=torch.tensor([math.nan if v is None else v for v in out["target_logprob"]], dtype=torch.float32),
        entropy=torch.tensor([math.nan if v is None else v for v in out["entropy"]], dtype=torch.float32),
        vocab_logprobs=None if vocab is None else torch.tensor(vocab, dtype=torch.float32),
    )
    tokens = data["tokens"]
    return Trace(
        model_id=meta["model_id"],
        architecture=meta["architecture"],
        policy=meta["policy"],
        device=meta["device"],
        dtype=meta["dtype"],
        prompt=meta["prompt"],
        generated_text=meta["generated_text"],
        timings_ms=meta["timings_ms"],
        source=meta.get("source", ""),
        token_ids=tokens["ids"],
        tokens=tokens["text"],
        step=tokens["step"],
        layers=layers,
        output=output,
    )


def to_json_text(trace: Trace, include_vocab: bool = False) -> str:
    """The trace as JSON text (schema 1)."""
    return json.dumps(to_dict(trace, include_vocab), ensure_ascii=False, allow_nan=False)


def from_json_text(text: str) -> Trace:
    """A trace from JSON text; ValueError if it is not JSON or not a moe-viz trace."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"text is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"text is not a moe-viz trace: JSON {type(data).__name__}, expected an object")
    return from_dict(data)


def save_json(trace: Trace, path: str | Path, include_vocab: bool = False) -> None:
    """Write the trace to ``path`` as JSON (schema 1)."""
    Path(path).write_text(to_json_text(trace, include_vocab), encoding="utf-8")


def load_json(path: str | Path) -> Trace:
    """Read a trace from a JSON file."""
    return from_json_text(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- Parquet
def save_parquet(trace: Trace, path: str | Path, include_vocab: bool = False) -> None:
    """Write one row per token: ``token_id``, ``token``, ``step``, per-layer list columns
    ``layer{L}.{array}`` and the output columns; meta and per-layer scalars go into the file's
    key-value metadata under ``moe_viz`` (the same schema-1 dict without the per-token arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = to_dict(trace, include_vocab)
    columns: dict[str, Any] = {
        "token_id": data["tokens"]["ids"],
        "token": data["tokens"]["text"],
        "step": data["tokens"]["step"],
    }
    for item in data["layers"]:
        for name in _LAYER_ARRAYS:
            values = item.pop(name)
            if values is not None:  # null score arrays of an engine import are not stored
                columns[f"layer{item['layer']}.{name}"] = values
    for name in ("top_ids", "top_logprobs", "top_tokens", "target_logprob", "entropy"):
        columns[f"output.{name}"] = data["output"].pop(name)
    if data["output"]["vocab_logprobs"] is not None:
        columns["output.vocab_logprobs"] = data["output"].pop("vocab_logprobs")
    data.pop("tokens")
    types = {name: _arrow_type(name) for name in columns}
    table = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()})
    table = table.replace_schema_metadata({"moe_viz": json.dumps(data, ensure_ascii=False)})
    pq.write_table(table, path)


def load_parquet(path: str | Path) -> Trace:
    """Read a trace from a Parquet file written by ``save_parquet``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if b"moe_viz" not in metadata:
        raise ValueError(f"{path} is not a moe-viz trace (no 'moe_viz' metadata)")
    data = json.loads(metadata[b"moe_viz"])
    cols = table.to_pydict()
    data["tokens"] = {"ids": cols["token_id"], "text": cols["token"], "step": cols["step"]}
    for item in data["layers"]:
        for name in _LAYER_ARRAYS:
            item[name] = cols.get(f"layer{item['layer']}.{name}")
    for name in ("top_ids", "top_logprobs", "top_tokens", "target_logprob", "entropy"):
        data["output"][name] = cols[f"output.{name}"]
    data["output"]["vocab_logprobs"] = cols.get("output.vocab_logprobs")
    return from_dict(data)


# How a layer's router works (added within schema 1; files without them read as a plain softmax router).
_ROUTER_FACTS: dict[str, object] = {
    "router_family": "softmax",
    "selection_bias": False,
    "group_limited": False,
    "shared_expert": False,
    "held_native": False,
    "scores_recorded": True,
    "ranked": True,
}

_LAYER_ARRAYS: dict[str, torch.dtype] = {
    "router_logits": torch.float32,
    "router_probs": torch.float32,
    "native_index": torch.long,
    "native_weights": torch.float32,
    "index": torch.long,
    "weights": torch.float32,
    "dropped": torch.bool,
}


# What an engine import does not have: stored as null, read back as NaN.
_SCORE_ARRAYS = ("router_logits", "router_probs", "native_weights", "weights")


def _array_or_null(lt: LayerTrace, name: str) -> list | None:
    if name in _SCORE_ARRAYS and not lt.scores_recorded:
        return None
    return getattr(lt, name).tolist()


def _layer_array(item: dict[str, Any], name: str, T: int) -> torch.Tensor:
    """One per-layer array of a schema-1 dict; a null score array (an engine import) as NaN of its shape."""
    values = item[name]
    if values is not None or name not in _SCORE_ARRAYS or item.get("scores_recorded", True):
        return torch.tensor(values, dtype=_LAYER_ARRAYS[name])
    if name in ("router_logits", "router_probs"):
        return torch.full((T, item["num_experts"]), math.nan)
    return torch.full(tuple(torch.tensor(item["index" if name == "weights" else "native_index"]).shape), math.nan)


def _arrow_type(column: str) -> Any:
    import pyarrow as pa

    name = column.rsplit(".", 1)[-1]
    if column in ("token_id", "step"):
        return pa.int64()
    if column == "token":
        return pa.string()
    if name == "top_tokens":
        return pa.list_(pa.string())
    if name in ("target_logprob", "entropy"):
        return pa.float32()
    if name in ("native_index", "index", "top_ids"):
        return pa.list_(pa.int64())
    if name == "dropped":
        return pa.list_(pa.bool_())
    return pa.list_(pa.float32())
