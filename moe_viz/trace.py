"""The trace of one run: every routing decision, per MoE layer, and the next-token predictions.

A ``Trace`` is frozen, plain data (dataclasses of CPU tensors) with queries (a layer, the
predictions at a position, a fingerprint). File formats (JSON, Parquet, pandas frames) live in
``trace_io``; metrics and views read traces and never change them.

Per layer: ``router_probs`` are the router's per-expert scores (softmax for softmax routers,
sigmoid for sigmoid routers); ``weights`` are the weights the experts' outputs were multiplied by
(0 where dropped). ``vocab_logprobs`` (the full next-token log-distribution) is kept in memory
when small enough: as the model's logits, or as the final hidden states its output head projects
when read (``_output_head``).

A trace imported from a serving engine (``moe_viz.engines``) holds expert ids only: its layers have
``scores_recorded=False`` (router scores and gate weights are NaN, and slot 0 is each token's
first choice, in the engine's descending-score order), its ``source`` names the engine and file,
and it has no next-token predictions (``has_predictions`` is False) unless it was recomputed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True, eq=False)
class LayerTrace:
    """Routing of one MoE layer over the T traced tokens."""

    layer: int
    num_experts: int
    top_k: int
    router_logits: torch.Tensor  # (T, E) float32
    router_probs: torch.Tensor  # (T, E) float32
    native_index: torch.Tensor  # (T, k) long: what the model's own router chose
    native_weights: torch.Tensor  # (T, k) float32
    index: torch.Tensor  # (T, k') long: what this run applied
    weights: torch.Tensor  # (T, k') float32, 0 where dropped
    dropped: torch.Tensor  # (T, k') bool
    capacity: list[int] | None = None  # per forward step (capacity policy only)
    capture_only: bool = False
    # How this layer's router works, so explanations can say what its numbers mean:
    router_family: str = "softmax"  # softmax | topk_softmax (top-k, then softmax) | sigmoid | sqrtsoftplus | capture
    selection_bias: bool = False  # a bias added to the scores for choosing only (DeepSeek-V3 style)
    group_limited: bool = False  # experts are chosen only inside each token's best groups
    shared_expert: bool = False  # a shared expert runs for every token beside the routed ones
    held_native: bool = False  # the run's policy could not run on this router, so it kept its native routing
    scores_recorded: bool = True  # False: imported expert ids only; router_logits/probs and weights are NaN
    ranked: bool = True  # slot 0 is the first choice (False: an import listing ids in expert-id order)

    @property
    def score_name(self) -> str:
        """What ``router_probs`` holds: 'probability' (a softmax over experts) or 'score' (sigmoid)."""
        return "score" if self.router_family in ("sigmoid", "sqrtsoftplus") else "probability"

    @property
    def scores_decide(self) -> bool:
        """True when the k highest ``router_probs`` are exactly the experts the router picks at its
        own k (no selection bias, no group limit, not capture-only, scores recorded)."""
        return self.scores_recorded and not (self.selection_bias or self.group_limited or self.capture_only)

    @property
    def first_choice_known(self) -> bool:
        """True when each token's first choice is known: from the scores, or from ranked slots."""
        return self.scores_recorded or self.ranked

    @property
    def applied_k(self) -> int:
        """Experts each token was routed to in this run (k'; E when every expert runs)."""
        return int(self.index.shape[1])

    @property
    def every_expert_runs(self) -> bool:
        return self.applied_k >= self.num_experts

    @property
    def num_tokens(self) -> int:
        return int(self.router_logits.shape[0])

    @property
    def dropped_count(self) -> int:
        return int(self.dropped.sum().item())

    def load(self) -> torch.Tensor:
        """(E,) number of kept assignments per expert."""
        kept = self.index[~self.dropped]  # (n,)
        return torch.bincount(kept, minlength=self.num_experts)


@dataclass(frozen=True, eq=False)
class OutputTrace:
    """Next-token predictions at every traced position. A run builds them lazily (a subclass in
    ``_trace_build``): the (T, V) log-softmax, top-k and entropy are computed when a field is
    first read, so a run whose predictions nobody reads does not pay for them."""

    top_ids: torch.Tensor  # (T, K) long
    top_logprobs: torch.Tensor  # (T, K) float32
    top_tokens: list[list[str]]  # (T, K)
    target_logprob: torch.Tensor  # (T,) float32: log p(actual next token); NaN at the last position
    entropy: torch.Tensor  # (T,) float32, nats
    vocab_logprobs: torch.Tensor | None = None  # (T, V) float32

    @property
    def has_predictions(self) -> bool:
        """False for an engine import (no next-token distribution was recorded)."""
        return int(self.top_ids.shape[1]) > 0

    @property
    def has_distribution(self) -> bool:
        """Whether the full next-token distribution was kept (``vocab_logprobs``), without
        computing it."""
        return self.vocab_logprobs is not None

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors this output holds in memory now (what a byte budget counts)."""
        held = [self.top_ids, self.top_logprobs, self.target_logprob, self.entropy]
        return held + ([self.vocab_logprobs] if self.vocab_logprobs is not None else [])

    def held_text_chars(self) -> int:
        return sum(len(t) for row in self.top_tokens for t in row)

    def window(self, start: int, stop: int) -> OutputTrace:
        """The predictions at positions ``start`` to ``stop - 1`` (``Trace.window`` checks the range)."""
        return self._slice_rows(slice(start, stop), with_distribution=True)

    def at(self, position: int) -> OutputTrace:
        """The predictions at one position, as a one-row ``OutputTrace`` (no full distribution).

        A run's lazy output computes just that row from its logits, so a page that shows one
        token's predictions does not pay for the whole vocabulary at every position."""
        position = range(len(self.entropy))[position]  # negative counts from the end; IndexError outside
        return self._slice_rows(slice(position, position + 1), with_distribution=False)

    def _slice_rows(self, rows: slice, with_distribution: bool) -> OutputTrace:
        vocab = self.vocab_logprobs if with_distribution else None
        return OutputTrace(
            top_ids=self.top_ids[rows],
            top_logprobs=self.top_logprobs[rows],
            top_tokens=self.top_tokens[rows],
            target_logprob=self.target_logprob[rows],
            entropy=self.entropy[rows],
            vocab_logprobs=None if vocab is None else vocab[rows],
        )


@dataclass(frozen=True, eq=False)
class Trace:
    """Everything one run under one routing policy did."""

    model_id: str
    architecture: str
    policy: str
    device: str
    dtype: str
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    step: list[int]
    layers: list[LayerTrace]
    output: OutputTrace
    generated_text: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    source: str = ""  # where the routing came from when it was imported ("" = computed by moe-viz)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_length(self) -> int:
        return sum(1 for s in self.step if s == 0)

    @property
    def has_predictions(self) -> bool:
        """False for an imported trace: engines record routing, not the next-token distribution."""
        return self.output.has_predictions

    @property
    def scores_recorded(self) -> bool:
        """True when every layer holds the router's scores (False for engine imports of expert ids)."""
        return all(layer.scores_recorded for layer in self.layers)

    @property
    def layer_ids(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    @property
    def capture_only(self) -> bool:
        return any(layer.capture_only for layer in self.layers)

    @property
    def held_native_layers(self) -> list[int]:
        """Layers whose router could not run this run's policy and kept their native routing."""
        return [layer.layer for layer in self.layers if layer.held_native]

    def layer(self, layer: int) -> LayerTrace:
        """The trace of decoder layer ``layer``; ValueError if it is not an MoE layer."""
        for item in self.layers:
            if item.layer == layer:
                return item
        raise ValueError(f"layer must be one of the MoE layers {self.layer_ids}; got {layer}")

    def fingerprint(self) -> str:
        """12 hex digits identifying the routing: token ids, policy, and every layer's applied experts
        and dropped mask. Two runs with the same fingerprint routed every token identically."""
        digest = hashlib.sha256(f"{self.policy}|{self.token_ids}".encode())
        for lt in self.layers:
            digest.update(lt.index.numpy().tobytes())
            digest.update(lt.dropped.numpy().tobytes())
        return digest.hexdigest()[:12]

    def nbytes(self) -> int:
        """Bytes this trace holds in memory: its tensors (the full next-token distribution, when
        kept, is most of it) and, roughly, its token texts. What a per-session budget counts."""
        tensors = [getattr(lt, name) for lt in self.layers for name in _PER_TOKEN_LAYER_FIELDS]
        tensors += self.output.held_tensors()  # counting does not compute lazy predictions
        texts = sum(len(t) for t in self.tokens) + self.output.held_text_chars()
        return sum(t.numel() * t.element_size() for t in tensors) + 8 * len(self.token_ids) + 2 * texts

    def window(self, start: int, stop: int) -> Trace:
        """The trace of tokens ``start`` to ``stop - 1`` (views of a long prompt zoom in with it): the
        same routing and predictions, cut to those positions. ValueError outside 0 <= start < stop <= T."""
        T = self.num_tokens
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer; got {value!r}")
        if not 0 <= start < stop <= T:
            raise ValueError(f"the window must satisfy 0 <= start < stop <= {T}; got start={start}, stop={stop}")
        if (start, stop) == (0, T):
            return self
        rows = slice(start, stop)
        layers = [
            replace(
                lt,
                **{name: getattr(lt, name)[rows] for name in _PER_TOKEN_LAYER_FIELDS},
            )
            for lt in self.layers
        ]
        output = self.output.window(start, stop)
        return replace(
            self,
            token_ids=self.token_ids[rows],
            tokens=self.tokens[rows],
            step=self.step[rows],
            layers=layers,
            output=output,
        )

    def check_position(self, position: int) -> int:
        """``position`` as an index 0 <= t < T (negative counts from the end); ValueError if out of range."""
        T = self.num_tokens
        if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
            raise ValueError(f"position must be an integer with {-T} <= position < {T}; got {position!r}")
        return position % T

    def next_token_loss(self) -> float:
        """Mean negative log-probability of the actual next token over the traced positions that
        have one (nats); NaN for a single token."""
        return -float(self.output.target_logprob[:-1].mean()) if self.num_tokens > 1 else float("nan")

    def predictions(self, position: int = -1, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` most likely next tokens after ``position``, as (token text, probability).

        ValueError for an imported trace: the engine recorded no next-token distribution."""
        position = self.check_position(position)
        if not self.has_predictions:
            raise ValueError("this trace has no next-token predictions: it was imported from an engine's routing")
        row = self.output.at(position)
        probs = row.top_logprobs[0, :n].exp().tolist()
        return list(zip(row.top_tokens[0][:n], probs))


_PER_TOKEN_LAYER_FIELDS = (
    "router_logits",
    "router_probs",
    "native_index",
    "native_weights",
    "index",
    "weights",
    "dropped",
)
