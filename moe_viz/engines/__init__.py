"""Routing recorded by the engines that serve and train the biggest MoE models, imported into moe-viz.

vLLM, SGLang, Megatron-LM and llama.cpp record which experts each token took (never the gate
weights; the router's logits only in Megatron's optional sidecar). Each module here reads one
engine's format, checked against that engine's source (the version is in its docstring):

| format          | what it reads                                                     | becomes         |
|-----------------|-------------------------------------------------------------------|-----------------|
| ``vllm``        | ``routed_experts``: an array, ``.npy``, base64, or a JSON answer  | traces          |
| ``sglang``      | a request's ``meta_info.routed_experts`` (JSON answer)            | traces          |
| ``sglang-dump`` | expert-distribution recorder dumps (``.pt``; stat / per-pass / per-token) | counts or traces |
| ``megatron``    | ``router_trace_rank{r}.jsonl`` (+ the logits sidecar)             | traces          |
| ``llamacpp``    | the moe-trace CSV                                                 | counts or traces |

``import_routing(format, path)`` returns an ``Imported``: per-sequence ``Trace``s (expert ids,
no scores unless the engine kept logits, no predictions) and/or ``CorpusAggregates`` of counts.
Every reader refuses a malformed file with a one-line ValueError naming the problem, before
anything is returned: nothing half-imported reaches a view.

    from moe_viz.engines import import_routing, ModelShape
    imported = import_routing("vllm", "routed.npy", shape=ModelShape.of(model), token_ids=ids)
    trace = imported.traces[0][1]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..corpus.aggregates import CorpusAggregates
from ..trace import Trace
from .routed import ModelShape, RoutedExperts, counts_to_aggregates, to_trace, with_tokens


@dataclass(frozen=True)
class Imported:
    """What one engine file held: labelled per-sequence traces, and/or count aggregates."""

    format: str
    traces: list[tuple[str, Trace]] = field(default_factory=list)  # (label, trace) in file order
    counts: CorpusAggregates | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.traces and self.counts is None:
            raise ValueError(f"the {self.format} file holds no routing")

    def trace(self, index: int = 0) -> Trace:
        """The ``index``-th sequence; ValueError naming the range."""
        n = len(self.traces)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise ValueError(f"sequence must be an integer with 0 <= sequence < {n}; got {index!r}")
        return self.traces[index][1]


@dataclass(frozen=True)
class Format:
    """One importable format: its name, what to call it in a page, the file endings it takes, and
    its reader ``read(path, shape, token_ids) -> Imported``; ``takes_token_ids`` is False where the
    file carries its own tokens."""

    name: str
    engine: str  # the engine, as views name it ("vLLM")
    label: str
    suffixes: tuple[str, ...]
    read: Callable[..., Imported]
    takes_token_ids: bool = True
    per_rank_files: bool = False  # a folder of one file per rank is one import


def _formats() -> dict[str, Format]:
    from . import llamacpp, megatron, sglang, vllm

    items = [vllm.FORMAT, sglang.FORMAT, sglang.DUMP_FORMAT, megatron.FORMAT, llamacpp.FORMAT]
    return {f.name: f for f in items}


def formats() -> dict[str, Format]:
    """Every importable format by name."""
    return _formats()


def import_routing(
    format: str,
    path: str | Path,
    shape: ModelShape | None = None,
    token_ids: list[int] | None = None,
) -> Imported:
    """Read ``path`` (a file, or a folder of per-rank files) in ``format``. ``shape`` (the model's
    MoE layers, experts, top-k and tokenizer; ``ModelShape.of(model)``) makes the import exact and
    shows token text; ``token_ids`` attach the tokens where the file has none."""
    known = formats()
    if format not in known:
        raise ValueError(f"format must be one of {sorted(known)}; got {format!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    return known[format].read(path, shape or ModelShape(), token_ids)


def parse_token_ids(text: str, name: str = "token ids") -> list[int]:
    """The token ids in ``text`` ('1,2,3', '1 2 3' or '[1, 2, 3]'), in order; [] when it holds none.

    ValueError naming ``name`` (how the caller's user typed them) for anything but non-negative
    integers."""
    parts = [p for p in re.split(r"[\s,\[\]]+", text) if p]
    bad = next((p for p in parts if not re.fullmatch(r"\d+", p)), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-negative integers separated by commas or spaces; got {bad[:20]!r}")
    return [int(p) for p in parts]


def recompute(trace: Trace, model: Any, **run_options: Any) -> Trace:
    """moe-viz's own native routing of the imported trace's tokens on ``model`` (a ``MoEModel``),
    to compare with the engine's (``moe_viz.agreement.agreement(imported, recomputed)``): the
    disagreement is the drift that kernels, batching and precision cause between engines.

    ValueError when the trace has no token ids or its MoE layers or experts are not the model's."""
    from .._runs import run_prompt

    if not trace.token_ids or min(trace.token_ids) < 0:
        raise ValueError("recomputing needs the token ids the engine routed; this import has none")
    if trace.layer_ids != list(model.moe_layers):
        raise ValueError(
            f"the import routes MoE layers {trace.layer_ids}, the model {list(model.moe_layers)}: not the same model"
        )
    experts = {lt.num_experts for lt in trace.layers}
    if experts != {model.num_experts}:
        raise ValueError(f"the import has {sorted(experts)} experts per layer, the model {model.num_experts}")
    return run_prompt(model, list(trace.token_ids), None, **run_options)


__all__ = [
    "Format",
    "Imported",
    "ModelShape",
    "RoutedExperts",
    "counts_to_aggregates",
    "formats",
    "import_routing",
    "parse_token_ids",
    "recompute",
    "to_trace",
    "with_tokens",
]
