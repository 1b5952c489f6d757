"""Turn what the hooks recorded (``Recorder``) into public ``Trace`` data.

Each recorded ``Forward`` holds one ``LayerCall`` per router with ``N = B*T`` token rows. A trace
is one sequence: it takes, from each forward, the rows of that sequence it needs (all rows of a
prompt; only the new row of a KV-cache decode step; the real tokens of a padded batch row).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._hooks import Forward, LayerCall
from ._output_head import KeptLogits, Logits, ProjectedLogits
from ._router_math import trace_scores
from ._routers import RouterSite
from .models import MoEModel
from .policies import Policy, policy_spec
from .trace import LayerTrace, OutputTrace, Trace

# Keep the full (T, V) log-distribution (needed for KL between modes) up to this many floats:
# 2,048 tokens x 16k vocabulary, 134 MB.
VOCAB_KEEP_LIMIT = 34_000_000
TOP_PREDICTIONS = 10

Rows = slice | torch.Tensor  # token rows of a forward: a slice, or a (n,) long tensor of row indices
ALL_ROWS = slice(None)  # every row of a forward (a prompt's run)


@dataclass(frozen=True)
class Part:
    """The rows of one forward that belong to the sequence being traced."""

    forward: Forward
    rows: Rows
    sequence: int = 0  # which sequence of the forward (for its capacity)


_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as the text it contributes (byte-level BPE markers turned into spaces).

    A token's text depends on its id alone (each is decoded on its own), so each tokenizer keeps
    the texts it has decoded: a page rebuilt for a new prompt decodes only the ids it has not seen."""
    try:
        known = _TOKEN_TEXTS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: decode every time
        known = {}
    try:
        return [known[i] for i in ids]  # every id seen before: the common case once a page has run
    except KeyError:
        pass
    new = sorted(set(ids) - known.keys())
    if new:
        known.update(zip(new, _decode_each(tokenizer, new), strict=True))
    return [known[i] for i in ids]


def _decode_each(tokenizer: Any, ids: list[int]) -> list[str]:
    if hasattr(tokenizer, "batch_decode"):  # one call into the fast tokenizer instead of len(ids)
        return list(
            tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _rows(parts: list[tuple[LayerCall, Rows, int]], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The sequence's rows of one recorded field, concatenated over the forwards that hold them,
    as a CPU tensor of ``dtype``.

    When the sequence is all of one forward's rows (a prompt) the recorded tensor itself is
    returned, not a copy: the router's outputs are fresh tensors that nothing writes after the
    router hook has read them. Part of a forward (one sequence of a batch) is copied, so that a
    trace kept on its own does not keep the whole batch's tensors alive."""
    first_rows = parts[0][1]
    if len(parts) == 1 and isinstance(first_rows, slice) and first_rows == ALL_ROWS:
        rows = getattr(parts[0][0], name)
    else:
        rows = torch.cat([getattr(c, name)[r] for c, r, _ in parts])
    # A no-op conversion still costs a dispatch per field, per layer, per run: skip it.
    return rows if rows.dtype is dtype and rows.is_cpu else rows.to("cpu", dtype)


def _layer_trace(
    site: RouterSite, parts: list[tuple[LayerCall, Rows, int]], logits: torch.Tensor, probs: torch.Tensor
) -> LayerTrace:
    spec = site.spec
    first = parts[0][0]
    if first.native_index is not None:
        native_index = _rows(parts, "native_index", torch.long)  # (T, k)
        native_weights = _rows(parts, "native_weights", torch.float32)  # (T, k)
    else:  # layouts that expose only logits: the native choice is the top-k of the logits
        native_index = logits.topk(spec.top_k, dim=-1).indices
        native_weights = probs.gather(1, native_index)
    if first.index is not None:
        index = _rows(parts, "index", torch.long)  # (T, k')
        weights = _rows(parts, "weights", torch.float32)  # (T, k')
        dropped = _rows(parts, "dropped", torch.bool)  # (T, k')
    else:
        index, weights = native_index, native_weights
        dropped = torch.zeros_like(index, dtype=torch.bool)
    capacity = [c.capacity[seq] for c, _, seq in parts if c.capacity is not None]
    return LayerTrace(
        layer=site.layer,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        router_logits=logits,
        router_probs=probs,
        native_index=native_index,
        native_weights=native_weights,
        index=index,
        weights=weights,
        dropped=dropped,
        capacity=capacity or None,
        capture_only=not spec.substitutable,
        router_family=spec.family,
        selection_bias=spec.bias_path is not None,
        group_limited=spec.group_limit is not None,
        shared_expert=site.shared_expert,
        held_native=any(c.held_native for c, _, _ in parts),
    )


def build_layers(model: MoEModel, parts: Sequence[Part]) -> list[LayerTrace]:
    """Per-layer traces of one sequence from the given rows of the recorded forwards."""
    by_layer: dict[int, list[tuple[LayerCall, Rows, int]]] = {}
    for part in parts:
        for call in part.forward.layers:
            by_layer.setdefault(call.layer, []).append((call, part.rows, part.sequence))
    sites = {s.layer: s for s in model.sites}
    layers = []
    for layer, calls in sorted(by_layer.items()):
        logits = _rows(calls, "logits", torch.float32)  # (T, E)
        # One score call per layer: stacking the layers into one call saves calls but costs more
        # in the copies, measured inside a run, where the caches are cold after the forward.
        probs = trace_scores(sites[layer].spec, logits)  # (T, E)
        layers.append(_layer_trace(sites[layer], calls, logits, probs))
    return layers


SUMMARY_FIELDS = ("top_ids", "top_logprobs", "top_tokens", "target_logprob", "entropy")


class LazyOutputTrace(OutputTrace):
    """An ``OutputTrace`` that keeps the model's (T, V) logits, in the model's dtype, as its one
    copy of the full next-token distribution: as they are, or as the (T, H) hidden states that the
    model's proven-plain output head projects (``_output_head``) when rows are read.

    * The summaries (top-K, entropy, log-prob of the actual next token) are computed from them when
      one is first read, all positions at once, exactly as ``output_trace`` computes them; ``at``
      computes one position alone.
    * ``vocab_logprobs`` is their float32 log-softmax, computed at each read and not kept: what a
      comparison needs (KL between modes) is computed once from it and cached with the statistics.

    So a run nobody reads predictions from costs the forward alone, and a kept distribution costs
    the model's dtype per entry (bf16: half the float32 log-probabilities it replaces), or H
    entries a row where the head projects them."""

    def __init__(  # noqa: D107
        self, tokenizer: Any, logits: torch.Tensor | Logits, ids: list[int], next_after: int | None = None
    ) -> None:
        # next_after: the token that followed the last row (a window of a longer run), None at the end
        kept = KeptLogits(logits) if isinstance(logits, torch.Tensor) else logits
        object.__setattr__(self, "_source", (tokenizer, kept, list(ids)))
        object.__setattr__(self, "_next_after", next_after)
        object.__setattr__(self, "_ready", False)

    def __getattr__(self, name: str) -> Any:  # only called for summaries not computed yet
        if name not in SUMMARY_FIELDS or self.__dict__.get("_source") is None:
            raise AttributeError(name)
        self._materialise()
        return self.__dict__[name]

    @property
    def vocab_logprobs(self) -> torch.Tensor:  # OutputTrace gives it a class default: no __getattr__
        logits = self.__dict__["_source"][1].full()  # (T, V)
        return logits.log_softmax(dim=-1, dtype=torch.float32)  # (T, V), the same numbers at every read

    def _materialise(self) -> None:
        if self.__dict__["_ready"]:
            return
        tokenizer, logits, ids = self.__dict__["_source"]
        full = predict(tokenizer, logits.full(), [*ids[1:], self.__dict__["_next_after"]], keep_vocab=False)
        self.__dict__.update({name: getattr(full, name) for name in SUMMARY_FIELDS})
        self.__dict__["_ready"] = True

    def at(self, position: int) -> OutputTrace:
        if self.__dict__["_ready"]:
            return super().at(position)
        tokenizer, logits, ids = self.__dict__["_source"]
        position = range(len(ids))[position]  # negative counts from the end; IndexError outside
        rows = self.__dict__.setdefault("_rows", {})
        if position not in rows:  # one row of logits, through the same maths as every row
            next_id = ids[position + 1] if position + 1 < len(ids) else self.__dict__["_next_after"]
            rows[position] = predict(tokenizer, logits.rows(position, position + 1), [next_id], keep_vocab=False)
        return rows[position]

    def window(self, start: int, stop: int) -> OutputTrace:
        """The rows ``start`` to ``stop - 1``, still lazy: a zoom into a long prompt computes the
        predictions of the rows it shows, not of every row (nor the full log-softmax)."""
        tokenizer, logits, ids = self.__dict__["_source"]
        after = ids[stop] if stop < len(ids) else self.__dict__["_next_after"]
        return LazyOutputTrace(tokenizer, logits.window(start, stop), ids[start:stop], next_after=after)

    @property
    def has_predictions(self) -> bool:
        return True

    @property
    def has_distribution(self) -> bool:  # the logits are kept: vocab_logprobs is computed when read
        return True

    def held_tensors(self) -> list[torch.Tensor]:
        logits = self.__dict__["_source"][1].held_tensors()
        if not self.__dict__["_ready"]:
            return logits
        return [*logits, self.top_ids, self.top_logprobs, self.target_logprob, self.entropy]

    def held_text_chars(self) -> int:
        return super().held_text_chars() if self.__dict__["_ready"] else 0


def output_trace(tokenizer: Any, logits: torch.Tensor, ids: list[int]) -> OutputTrace:
    """Top-K predictions, log-prob of the actual next token and entropy at every position."""
    T, V = logits.shape
    return predict(tokenizer, logits, [*ids[1:], None], keep_vocab=T * V <= VOCAB_KEEP_LIMIT)


def predict(tokenizer: Any, logits: torch.Tensor, next_ids: list[int | None], keep_vocab: bool) -> OutputTrace:
    """Predictions for each row of ``logits`` (n, V); ``next_ids[i]`` is the token that actually
    followed row i (None where none did: its target log-prob is NaN)."""
    # Few full-size (n, V) temporaries: each fresh one costs page faults comparable to the maths.
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32).cpu()  # (n, V)
    T, V = logprobs.shape
    top = logprobs.topk(min(TOP_PREDICTIONS, V), dim=-1)  # (n, K)
    target = torch.full((T,), float("nan"))
    known = [i for i, nxt in enumerate(next_ids) if nxt is not None]
    if known:
        rows = torch.tensor(known)
        target[rows] = logprobs[rows].gather(1, torch.tensor([next_ids[i] for i in known]).unsqueeze(1)).squeeze(1)
    entropy = -torch.bmm(logprobs.exp().unsqueeze(1), logprobs.unsqueeze(2)).view(T)  # (n,)
    bad = entropy.isnan()  # rows with -inf log-probs (masked tokens): 0 * -inf; redo them with 0 log 0 = 0
    if bad.any():
        rows = logprobs[bad]  # (m, V)
        entropy[bad] = -(rows.exp() * rows.clamp(min=torch.finfo(rows.dtype).min)).sum(dim=-1)
    unique = top.indices.unique().tolist()
    vocab_tokens = dict(zip(unique, token_texts(tokenizer, unique), strict=True))
    return OutputTrace(
        top_ids=top.indices,
        top_logprobs=top.values,
        top_tokens=[[vocab_tokens[i] for i in row] for row in top.indices.tolist()],
        target_logprob=target,
        entropy=entropy,
        vocab_logprobs=logprobs if keep_vocab else None,
    )


def make_trace(
    model: MoEModel,
    policy: Policy | None,
    prompt: str,
    ids: list[int],
    step: list[int],
    layers: list[LayerTrace],
    logits: torch.Tensor | ProjectedLogits,
    timings: dict[str, float],
    generated_text: str | None = None,
) -> Trace:
    """The finished trace; ``logits`` (T, V) are the model's next-token logits at every position
    (or the hidden states its output head projects to them, ``ProjectedLogits``)."""
    t0 = time.perf_counter()
    T, V = logits.shape
    # Predictions are built when first read; beyond the size kept for the full distribution they
    # are built now, so a long run does not hold its (T, V) logits until someone reads them.
    lazy = T * V <= VOCAB_KEEP_LIMIT
    if lazy:
        output = LazyOutputTrace(model.tokenizer, logits, ids)
    else:
        output = output_trace(model.tokenizer, logits if isinstance(logits, torch.Tensor) else logits.full(), ids)
    trace = Trace(
        model_id=model.model_id,
        architecture=model.architecture,
        policy=policy_spec(policy),
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        prompt=prompt,
        token_ids=ids,
        tokens=token_texts(model.tokenizer, ids),
        step=step,
        layers=layers,
        output=output,
        generated_text=generated_text,
        timings_ms=timings,
    )
    timings["trace_ms"] = timings.get("trace_ms", 0.0) + (time.perf_counter() - t0) * 1e3
    return trace
