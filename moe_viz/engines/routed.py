"""Expert ids recorded by an engine, turned into moe-viz data: a ``Trace`` per sequence, or
``CorpusAggregates`` for count-only dumps.

Every importer reads its format into ``RoutedExperts`` (per-token ids) or a count array, and the
two functions here do the rest, with one set of checks: expert ids in range, no expert twice in a
token's slots, empty slots (``-1``) only as whole columns, dense layers (zero-filled by vLLM)
recognised and left out, the token ids the routing belongs to attached and checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._trace_build import token_texts
from ..corpus.aggregates import CorpusAggregates, CorpusMeta, empty
from ..trace import LayerTrace, OutputTrace, Trace

MAX_COUNT_GROUPS = 200  # resampling groups of a count import (as many as a corpus run keeps)


@dataclass(frozen=True)
class RoutedExperts:
    """The experts one sequence's tokens took, as an engine recorded them.

    ``expert_ids`` (T, L, k): axis 1 runs over ``layers`` (decoder-layer ids), -1 marks an empty
    slot; slot 0 is each token's first choice. ``logits`` (T, L, E), where the engine kept the
    router's logits. ``notes`` say which quirks of the format were handled on the way in.
    """

    engine: str
    expert_ids: np.ndarray  # (T, L, k) int64
    layers: tuple[int, ...]
    token_ids: list[int] | None = None  # (T,) or (T + 1,) when the last token was never routed
    logits: np.ndarray | None = None  # (T, L, E) float32
    notes: tuple[str, ...] = field(default_factory=tuple)
    ranked: bool = True  # slot 0 is the first choice (False: ids listed in expert-id order)
    score_function: str = "softmax"  # how the router turns ``logits`` into scores: softmax | sigmoid

    def __post_init__(self) -> None:
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 3:
            shape = getattr(ids, "shape", None)
            raise ValueError(f"expert ids must be an array of shape (tokens, layers, top_k); got shape {shape}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"expert ids must be integers; got dtype {ids.dtype}")
        if ids.shape[0] == 0:
            raise ValueError("expert ids hold no token")
        if len(self.layers) != ids.shape[1]:
            raise ValueError(f"layers names {len(self.layers)} layers but the expert ids hold {ids.shape[1]}")


@dataclass(frozen=True)
class ModelShape:
    """What the model says about its routing, when the user names it: which decoder layers are
    MoE, how many experts, its top-k; and its tokenizer to show tokens."""

    moe_layers: tuple[int, ...] | None = None
    num_layers: int | None = None  # decoder layers, MoE or dense
    num_experts: int | None = None
    top_k: int | None = None
    tokenizer: Any = None
    model_id: str = ""
    architecture: str = ""

    @staticmethod
    def of(model: Any) -> ModelShape:
        """The shape of a loaded ``MoEModel``."""
        return ModelShape(
            moe_layers=tuple(model.moe_layers),
            num_layers=int(model.num_layers),
            num_experts=int(model.num_experts),
            top_k=int(model.top_k),
            tokenizer=model.tokenizer,
            model_id=model.model_id,
            architecture=model.architecture,
        )


def _moe_layer_positions(routed: RoutedExperts, shape: ModelShape, notes: list[str]) -> list[int]:
    """Positions on the layer axis that hold MoE routing: the model's MoE layers when known, else
    every layer that is not a zero-filled dense placeholder."""
    ids = routed.expert_ids
    if (
        shape.num_layers is not None
        and routed.layers == tuple(range(ids.shape[1]))
        and ids.shape[1] != shape.num_layers
    ):
        raise ValueError(
            f"the file holds {ids.shape[1]} layers, the model {shape.num_layers} decoder layers: is it the same model?"
        )
    if shape.moe_layers is not None:
        missing = [layer for layer in shape.moe_layers if layer not in routed.layers]
        if missing:
            raise ValueError(
                f"the model's MoE layers {list(shape.moe_layers)} are not all in the file: layers {missing} are "
                f"missing (the file holds layers {routed.layers[0]}..{routed.layers[-1]}); is it the same model?"
            )
        positions = [routed.layers.index(layer) for layer in shape.moe_layers]
        skipped = len(routed.layers) - len(positions)
        if skipped:
            notes.append(f"{skipped} dense layers left out (the model's MoE layers are {list(shape.moe_layers)})")
        return positions
    k = ids.shape[2]
    # A layer whose every slot is expert 0 is vLLM's placeholder for a dense layer when k > 1 (a
    # real top-k never repeats an expert); at k = 1 it could be real, and is kept with a note.
    zero = [i for i in range(ids.shape[1]) if (ids[:, i, :] == 0).all()]
    if zero and k > 1:
        notes.append(
            f"{len(zero)} zero-filled dense layers left out (decoder layers {[routed.layers[i] for i in zero]})"
        )
        return [i for i in range(ids.shape[1]) if i not in zero]
    if zero:
        notes.append(
            f"layers {[routed.layers[i] for i in zero]} send every token to expert 0: kept as MoE layers; name the "
            "model if they are dense placeholders"
        )
    return list(range(ids.shape[1]))


def _layer_slots(ids: np.ndarray, layer: int) -> np.ndarray:
    """(T, k) ids of one layer without its empty (-1) columns; ValueError on ragged or repeated slots."""
    empty_cols = (ids < 0).all(axis=0)  # (k,)
    ids = ids[:, ~empty_cols]
    if ids.shape[1] == 0:
        raise ValueError(f"layer {layer} holds no expert id (every slot is -1)")
    if (ids < 0).any():
        t = int(np.nonzero((ids < 0).any(axis=1))[0][0])
        raise ValueError(
            f"layer {layer}: token {t} has fewer experts than the others (-1 slots: {ids[t].tolist()}); moe-viz "
            "needs the same number of experts per token in a layer"
        )
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeated.any():
        t = int(np.nonzero(repeated)[0][0])
        raise ValueError(f"layer {layer}: token {t} lists an expert twice ({ids[t].tolist()}); not a top-k routing")
    return ids


def _attach_tokens(routed: RoutedExperts, token_ids: list[int] | None, notes: list[str]) -> list[int] | None:
    """The token ids of the routed rows. vLLM records no routing for the last token of a sequence
    (it was never fed through the model): ids one longer than the routing lose their last."""
    ids = routed.token_ids if routed.token_ids is not None else token_ids
    if ids is None:
        return None
    ids = [int(i) for i in ids]
    T = routed.expert_ids.shape[0]
    if len(ids) == T:
        return ids
    if len(ids) < T:
        raise ValueError(f"token ids must number at least {T} (the routed tokens); got {len(ids)}")
    skipped = len(ids) - T - 1  # tokens the request asked the engine to skip (a prompt start offset)
    notes.append("the last token has no routing (the engine never ran it through the model): shown without it")
    if skipped:
        notes.append(
            f"the first {skipped} tokens have no routing (the request skipped them: vLLM's routed_experts_prompt_start, "
            "SGLang's routed_experts_start_len): shown without them"
        )
    return ids[skipped : skipped + T]


def to_trace(routed: RoutedExperts, shape: ModelShape | None = None, token_ids: list[int] | None = None) -> Trace:
    """A ``Trace`` of the engine's routing: expert ids per token and MoE layer, no gate weights
    (NaN), router scores only where the engine kept logits, no next-token predictions."""
    shape = shape or ModelShape()
    notes = list(routed.notes)
    ids_all = routed.expert_ids.astype(np.int64)
    positions = _moe_layer_positions(routed, shape, notes)
    if not positions:
        raise ValueError("the file holds no MoE layer (every layer is a zero-filled dense placeholder)")
    slots = {routed.layers[i]: _layer_slots(ids_all[:, i, :], routed.layers[i]) for i in positions}
    seen = max(int(s.max()) for s in slots.values()) + 1
    E = shape.num_experts
    if E is None:
        E = seen
        notes.append(f"{E} experts assumed (the highest expert id seen + 1); name the model to set it")
    elif seen > E:
        raise ValueError(f"the file routes to expert {seen - 1}, but the model has {E} experts (0..{E - 1})")
    tokens = _attach_tokens(routed, token_ids, notes)
    T = ids_all.shape[0]
    layers = []
    for i in positions:
        index = torch.from_numpy(slots[routed.layers[i]])  # (T, k)
        logits = routed.logits[:, i, :] if routed.logits is not None else None
        layers.append(_layer_trace(routed, routed.layers[i], index, E, shape.top_k or int(index.shape[1]), logits))
    if tokens is not None and shape.tokenizer is not None:
        texts = token_texts(shape.tokenizer, tokens)
    elif tokens is not None:
        texts = [f"[{i}]" for i in tokens]
    else:
        texts = [f"#{t}" for t in range(T)]
    source = routed.engine + ("" if not notes else " — " + "; ".join(notes))
    return Trace(
        model_id=shape.model_id or "(imported)",
        architecture=shape.architecture,
        policy="native",
        device="engine",
        dtype="",
        prompt="".join(texts) if tokens is not None and shape.tokenizer is not None else "",
        token_ids=tokens if tokens is not None else [-1] * T,
        tokens=texts,
        step=[0] * T,
        layers=layers,
        output=_no_predictions(T),
        source=source,
    )


def _layer_trace(
    routed: RoutedExperts, layer: int, index: torch.Tensor, E: int, top_k: int, logits: np.ndarray | None
) -> LayerTrace:
    T, k = index.shape
    if logits is not None:  # the engine kept the router's logits: the scores follow from its score function
        router_logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))  # (T, E)
        if routed.score_function == "sigmoid":
            router_probs = router_logits.sigmoid()  # (T, E)
        else:
            router_probs = router_logits.softmax(dim=-1)  # (T, E)
        # Slots in descending score order, so slot 0 is the first choice whatever order the file used.
        index = index.gather(1, router_probs.gather(1, index).argsort(dim=1, descending=True, stable=True))
        weights = router_probs.gather(1, index)  # (T, k) before any renormalisation
    else:
        router_logits = router_probs = torch.full((T, E), math.nan)
        weights = torch.full((T, k), math.nan)
    return LayerTrace(
        layer=layer,
        num_experts=E,
        top_k=top_k,
        router_logits=router_logits,
        router_probs=router_probs,
        native_index=index,
        native_weights=weights,
        index=index,
        weights=weights,
        dropped=torch.zeros((T, k), dtype=torch.bool),
        router_family="sigmoid" if logits is not None and routed.score_function == "sigmoid" else "softmax",
        scores_recorded=logits is not None,
        ranked=routed.ranked or logits is not None,
    )


def _no_predictions(T: int) -> OutputTrace:
    """An engine records routing, not the next-token distribution."""
    return OutputTrace(
        top_ids=torch.zeros((T, 0), dtype=torch.long),
        top_logprobs=torch.zeros((T, 0)),
        top_tokens=[[] for _ in range(T)],
        target_logprob=torch.full((T,), math.nan),
        entropy=torch.full((T,), math.nan),
    )


def with_tokens(trace: Trace, token_ids: list[int], tokenizer: Any = None) -> Trace:
    """``trace`` with token ids (and their text) attached after the import."""
    if len(token_ids) != trace.num_tokens:
        raise ValueError(f"token ids must number {trace.num_tokens}; got {len(token_ids)}")
    texts = token_texts(tokenizer, token_ids) if tokenizer is not None else [f"[{i}]" for i in token_ids]
    return replace(trace, token_ids=[int(i) for i in token_ids], tokens=texts)


# ----------------------------------------------------------------------------- count-only dumps
def counts_to_aggregates(
    counts: np.ndarray,
    layers: tuple[int, ...],
    *,
    engine: str,
    shape: ModelShape | None = None,
    notes: tuple[str, ...] = (),
) -> CorpusAggregates:
    """Corpus aggregates of per-step expert counts ``counts`` (S, L, E): assignments per forward
    step (or file row), layer and expert. Step s goes to resampling group s mod G (G = S up to
    200), so intervals resample whole steps. One domain, "all"; tokens per step are the step's
    assignments in its first MoE layer divided by k (the model's top-k: ValueError without it)."""
    shape = shape or ModelShape()
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.dtype.kind not in "iu":
        raise ValueError(
            f"counts must be integers of shape (steps, layers, experts); got {counts.dtype} {counts.shape}"
        )
    if (counts < 0).any():
        raise ValueError("counts must not be negative")
    if len(layers) != counts.shape[1]:
        raise ValueError(f"layers names {len(layers)} layers but the counts hold {counts.shape[1]}")
    keep = [i for i in range(counts.shape[1]) if counts[:, i, :].any()]
    if shape.moe_layers is not None:
        keep = [layers.index(layer) for layer in shape.moe_layers if layer in layers]
    if not keep:
        raise ValueError("the counts are zero in every layer")
    counts = counts[:, keep, :].astype(np.int64)  # (S, L, E)
    moe_layers = tuple(layers[i] for i in keep)
    S, L, E = counts.shape
    if shape.num_experts is not None and shape.num_experts != E:
        raise ValueError(f"the file counts {E} experts, but the model has {shape.num_experts}")
    k = shape.top_k
    if not k:
        raise ValueError(
            "a count-only file does not say how many experts each token took: name the model (or give top_k) so "
            "tokens = assignments / k"
        )
    G = min(S, MAX_COUNT_GROUPS)
    meta = CorpusMeta(
        model_id=shape.model_id or "(imported)",
        policy="native",
        layers=moe_layers,
        num_experts=E,
        top_k=tuple([k] * L),
        vocab_size=0,
        window=1,
        groups=G,
        position_bucket=1,
        source=engine + ("" if not notes else " — " + "; ".join(notes)),
        native_top_k=tuple([k] * L),
        unit="recorded step",
    )
    agg = empty(meta, ["all"])
    group = np.arange(S) % G  # (S,)
    step_tokens = counts[:, 0, :].sum(axis=1) // k  # (S,)
    np.add.at(agg.assigned[:, :, 0, :], group, counts)
    np.add.at(agg.tokens[:, 0], group, step_tokens)
    # One row per step where a corpus run has one per document: the statistics count their units here.
    agg.docs = pd.DataFrame(
        {
            "ordinal": np.arange(S),
            "name": [f"step {s}" for s in range(S)],
            "domain": "all",
            "group": group,
            "tokens": step_tokens,
            "nll": 0.0,
            "scored": 0,
        }
    )
    agg.doc_loads = counts.copy()  # (S, L, E)
    agg.chunks_done = S
    agg.documents_done = S
    return agg
