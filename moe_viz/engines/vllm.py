"""vLLM's ``routed_experts``: the experts every token of a request took (``--enable-return-routed-experts``).

Checked against the released vLLM wheels 0.14.0, 0.17.0, 0.20.0, 0.21.0, 0.22.0 and 0.34.0
(``model_executor/layers/fused_moe/routed_experts_capturer.py``, ``entrypoints/openai/*/protocol.py``,
``utils/serial_utils.py``). The layout changed between releases, so shape and dtype are read from
the data, never assumed:

| vLLM        | dtype                       | layer axis                                  | HTTP answer |
|-------------|-----------------------------|---------------------------------------------|-------------|
| 0.14 – 0.20 | int32                       | every decoder layer, dense ones zero-filled | none (Python API) |
| 0.21        | int16                       | MoE layers only                             | JSON lists: ``choices[i].routed_experts`` (generated) + top-level ``prompt_routed_experts`` |
| 0.22 – 0.34 | uint8 (E <= 256) or uint16  | every decoder layer, dense ones zero-filled | base64 of an ``.npy`` file in ``choices[i].routed_experts`` |

The array is ``(tokens, layers, top_k)`` and holds one row per token **except the last** (the
last sampled token was never fed through the model); 0.34's request field
``routed_experts_prompt_start`` also skips the first N prompt tokens. Slot order is the fused
top-k kernel's: highest score first.

Readable here: a ``.npy`` file (``RequestOutput.outputs[i].routed_experts`` saved with
``np.save``), or a ``.json`` file holding an HTTP answer (chat, completions or generate), a bare
base64 ``.npy`` string, or nested lists. Token ids come from the answer (``prompt_token_ids`` +
each choice's ``token_ids``, when the request asked for them) or from the user.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import Format, Imported
from .routed import ModelShape, RoutedExperts, to_trace

ENGINE = "vLLM"
MAX_DIMENSION = 1 << 24  # no axis of a routing array is longer (tokens, layers or top-k): bounds a hostile header


def from_array(
    array: Any, shape: ModelShape | None = None, token_ids: list[int] | None = None, label: str = "vLLM routed_experts"
):  # noqa: ANN201 - a Trace
    """The trace of one ``routed_experts`` array (the Python API's ``RequestOutput.outputs[i].routed_experts``)."""
    shape = shape or ModelShape()
    return to_trace(_routed(np.asarray(array), shape, token_ids, label), shape)


def _routed(ids: np.ndarray, shape: ModelShape, token_ids: list[int] | None, label: str) -> RoutedExperts:
    """``RoutedExperts`` of one array, its layer axis named: every decoder layer (0.14 – 0.20,
    0.22+), or the MoE layers only (0.21) when the array has exactly as many layers as the model
    has MoE layers and fewer than its decoder layers."""
    if ids.ndim != 3:
        raise ValueError(f"vLLM routed_experts must have 3 axes (tokens, layers, top_k); got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"vLLM routed_experts must hold integers; got dtype {ids.dtype}")
    L = ids.shape[1]
    layers = tuple(range(L))
    notes = []
    moe = shape.moe_layers
    if moe is not None and shape.num_layers is not None and L == len(moe) and L != shape.num_layers:
        layers = tuple(moe)  # vLLM 0.21: one slot per MoE layer
        notes.append("one slot per MoE layer (vLLM 0.21 layout)")
    return RoutedExperts(f"{ENGINE} {label}", ids.astype(np.int64), layers, token_ids=token_ids, notes=tuple(notes))


def decode_npy(data: bytes, what: str) -> np.ndarray:
    """An ``.npy`` buffer as an array; pickled object arrays are refused (``allow_pickle=False``)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{what} is not a readable .npy array ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{what} is an .npz archive, not one .npy array")
    return array


def _b64_npy(text: str, what: str) -> np.ndarray:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is neither nested lists nor base64") from None
    return decode_npy(data, what)


def _as_array(value: Any, what: str) -> np.ndarray:
    """A ``routed_experts`` field: nested lists (vLLM 0.21) or a base64 ``.npy`` (0.22+)."""
    if isinstance(value, str):
        return _b64_npy(value, what)
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(f"{what} is ragged: rows of different lengths") from None
        if array.size == 0:
            return np.zeros((0, 0, 0), np.int64)
        if array.ndim != 3 or array.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integer lists of shape (tokens, layers, top_k); got {array.shape}")
        return array
    raise ValueError(f"{what} must be a base64 string or nested lists; got {type(value).__name__}")


def _choice_sequences(answer: dict[str, Any]) -> list[tuple[str, np.ndarray, list[int] | None]]:
    """(label, ids, token ids) per choice of an HTTP answer."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError("the JSON answer has no 'choices' list")
    prompt_part = answer.get("prompt_routed_experts")  # vLLM 0.21: the prompt's rows, shared by the choices
    prompt_ids = answer.get("prompt_token_ids")
    out = []
    for i, choice in enumerate(choices):
        if isinstance(choice, dict) and choice.get("routed_experts") is None and prompt_part is not None:
            choice = {**choice, "routed_experts": []}  # vLLM 0.21 sends None for an empty generated part (one token)
        if not isinstance(choice, dict) or choice.get("routed_experts") is None:
            raise ValueError(
                f"choice {i} has no routed_experts: start the server with --enable-return-routed-experts "
                "(vLLM >= 0.21 for HTTP answers; streaming answers do not carry it)"
            )
        ids = _as_array(choice["routed_experts"], f"choices[{i}].routed_experts")
        if prompt_part is not None:
            prompt = _as_array(prompt_part, "prompt_routed_experts")
            if prompt.size and ids.size and prompt.shape[1:] != ids.shape[1:]:
                raise ValueError(
                    f"prompt_routed_experts has (layers, top_k) {prompt.shape[1:]} but choice {i} has {ids.shape[1:]}"
                )
            ids = np.concatenate([p for p in (prompt, ids) if p.size]) if prompt.size else ids
        tokens = None
        own = choice.get("token_ids")
        if isinstance(prompt_ids, list) and isinstance(own, list):
            tokens = [*prompt_ids, *own]
        out.append((f"choice {i}", ids, tokens))
    return out


def _sequences(path: Path) -> list[tuple[str, np.ndarray, list[int] | None]]:
    if path.is_dir():
        raise ValueError("a vLLM import reads one file (.npy or .json), not a folder")
    if path.suffix == ".npy":
        return [(path.name, decode_npy(path.read_bytes(), path.name), None)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} is neither an .npy array nor JSON ({err.__class__.__name__})") from None
    if isinstance(data, str):
        return [(path.name, _b64_npy(data, path.name), None)]
    if isinstance(data, list):
        return [(path.name, _as_array(data, path.name), None)]
    if isinstance(data, dict) and "choices" in data:
        return _choice_sequences(data)
    if isinstance(data, dict) and "routed_experts" in data:
        return [(path.name, _as_array(data["routed_experts"], "routed_experts"), None)]
    raise ValueError(f"{path.name} holds no vLLM routed_experts (expected an HTTP answer with 'choices')")


def read(path: Path, shape: ModelShape, token_ids: list[int] | None = None) -> Imported:
    """Every sequence of a vLLM file (see the module docstring)."""
    traces = []
    for label, ids, tokens in _sequences(path):
        if ids.size == 0:
            raise ValueError(f"{label}: routed_experts is empty (the request was aborted before any forward)")
        if max(ids.shape) > MAX_DIMENSION:
            raise ValueError(f"{label}: routed_experts has an implausible shape {ids.shape}")
        routed = _routed(ids, shape, tokens if tokens is not None else token_ids, "routed_experts")
        traces.append((label, to_trace(routed, shape)))
    return Imported("vllm", traces)


FORMAT = Format(
    name="vllm",
    engine=ENGINE,
    label="vLLM routed_experts (.npy, or a JSON answer)",
    suffixes=(".npy", ".json"),
    read=read,
)
