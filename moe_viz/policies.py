"""Routing policies: values that say how tokens are sent to experts for one call.

A policy is passed per call (``run_prompt(model, prompt, TopK(1))``) and never written on the
model. ``None`` means "the model's own routing, recorded only".

**The protocol.** A policy is an instance of ``Policy`` (subclass it, usually as a frozen
dataclass). The router hooks call two methods, so a new kind of policy plugs in without any
change to the engine:

* ``validate(router)``: raise ``ValueError`` (naming the argument, the value and the allowed
  range) if the policy cannot run on a router described by ``router`` (a ``RouterSpec``). Called
  for every router of the model before a run starts.
* ``decide(call)``: given one router's ``RouterCall`` of one forward (its logits, the native
  choice, which sequence each token row belongs to), return a ``RoutingDecision`` (which experts,
  with which weights, which assignments were dropped), or ``None`` to keep the model's own routing.

Four optional attributes describe the policy to the rest of the system: ``spec`` (its short
text form, as ``parse_policy`` reads it back), ``experts_per_token(router)`` (cost, for request
limits), ``runs_every_expert`` (ensemble-like policies), ``capacity_factor`` (the factor a
capacity limit uses, if any) and ``recompute_when_generating`` (True when a token's routing
depends on the other tokens of the forward, so generation must recompute the whole sequence).

The built-in policies:

* ``TopK(k)``: each token goes to its k best experts. ``k`` equal to the model's own k is the
  native mode and reproduces the model's forward exactly.
* ``Capacity(factor, k, priority)``: top-k, then each expert takes at most
  ``C = ceil(factor * T * k / E)`` assignments over the T tokens of a sequence (Switch/GShard).
  Over-capacity assignments get weight 0 (the token rides the residual path, plus any shared
  expert); surviving weights are **not** renormalised.
* ``Ensemble(weighting)``: every expert runs for every token, weighted by the full router
  distribution ("gate") or by scale/E ("uniform").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ._router_math import apply_capacity, capacity_for, gate_weights, route_top_k
from ._routers import RouterSpec

PRIORITIES = ("position", "probs")
WEIGHTINGS = ("gate", "uniform")


@dataclass(frozen=True)
class RouterCall:
    """What a policy sees of one router in one forward.

    ``N`` token rows: a batch of B sequences of length T is flattened row-major (row b*T + t).
    """

    router: RouterSpec
    logits: torch.Tensor  # (N, E) router logits, the model's dtype
    selection_bias: torch.Tensor | None = None  # (E,) selection-only bias (DeepSeek-V3 correction bias)
    native_index: torch.Tensor | None = None  # (N, k) the model's own choice, when the router exposes it
    native_weights: torch.Tensor | None = None  # (N, k)
    groups: torch.Tensor | None = None  # (N,) long: the sequence each row belongs to, -1 = padding; None = one
    layer: int | None = None  # the decoder layer of this router (interventions act per layer)

    @property
    def num_tokens(self) -> int:
        return int(self.logits.shape[0])

    def sequences(self) -> list[torch.Tensor]:
        """Row indices of each sequence in the forward, padding rows left out, in sequence order."""
        if self.groups is None:
            return [torch.arange(self.num_tokens, device=self.logits.device)]
        ids = sorted(set(self.groups.tolist()) - {-1})
        return [(self.groups == g).nonzero().flatten() for g in ids]


@dataclass(frozen=True)
class RoutingDecision:
    """A policy's decision for the N token rows of one router call.

    ``index`` (N, k') long, ``weights`` (N, k') float32 with the architecture's scaling applied and
    0 where an assignment was dropped, ``dropped`` (N, k') bool, ``capacity``: the per-expert
    capacity of each sequence of the forward (in ``RouterCall.sequences()`` order), or None.
    """

    index: torch.Tensor
    weights: torch.Tensor
    dropped: torch.Tensor
    capacity: tuple[int, ...] | None = None


class Policy(ABC):
    """The routing-policy protocol (see the module docstring). Subclass it and implement ``decide``."""

    runs_every_expert: ClassVar[bool] = False
    recompute_when_generating: ClassVar[bool] = False

    @property
    def layers(self) -> frozenset[int] | None:
        """The decoder layers this policy names (None: it acts on every layer); a model without
        one of them refuses the policy with a message."""
        return None

    @property
    def spec(self) -> str:
        """The short text form, e.g. ``"top-k:2"``; shown in pages and stored in traces."""
        return type(self).__name__

    @property
    def capacity_factor(self) -> float | None:
        """The capacity factor this policy enforces (request limits bound it), or None."""
        return None

    def experts_per_token(self, router: RouterSpec) -> int:
        """How many experts each token asks for on ``router`` (request limits bound it)."""
        return router.top_k

    def validate(self, router: RouterSpec) -> None:
        """Raise ValueError if this policy cannot run on ``router``. The default refuses routers whose
        maths moe-viz does not reproduce (capture-only): a decision there could be silently wrong."""
        if not router.substitutable:
            kind = "has partial support" if router.family == "native" else "is capture-only"
            raise ValueError(
                f"policy {self.spec!r} needs a router whose maths moe-viz reproduces; this router {kind} "
                "(only the native routing, policy None, and capacity at the model's own k can run)"
                if router.family == "native"
                else f"policy {self.spec!r} needs a router whose maths moe-viz reproduces; this router {kind} "
                "(only the native routing, policy None, is recorded)"
            )

    @abstractmethod
    def decide(self, call: RouterCall) -> RoutingDecision | None:
        """The routing of ``call``'s token rows, or None to keep the model's own routing."""


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name} must satisfy {bound}; got {value}")
    return value


def _check_k(k: int | None, router: RouterSpec) -> None:
    if k is not None and k > router.num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= {router.num_experts} (the number of experts); got {k}")


def top_k_routing(call: RouterCall, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weights), each (N, k): the architecture's own choice and weights at ``k``."""
    return route_top_k(call.router, call.logits, k, call.selection_bias)  # (N, k) each


def capacity_decision(
    call: RouterCall, index: torch.Tensor, weights: torch.Tensor, factors: list[float], priority: str
) -> RoutingDecision:
    """Drop the assignments of ``index`` / ``weights`` (N, k) over each expert's capacity, counted
    per sequence of the forward (padding excluded); sequence i uses ``factors[i % len(factors)]``."""
    k, E = index.shape[1], call.router.num_experts
    dropped = torch.zeros_like(index, dtype=torch.bool)  # (N, k)
    capacities = []
    # one sequence: every row, as a slice (views, not gathered copies)
    sequences: list[slice | torch.Tensor] = [slice(None)] if call.groups is None else call.sequences()
    for i, rows in enumerate(sequences):
        capacity = capacity_for(factors[i % len(factors)], index[rows].shape[0], k, E)
        capacities.append(capacity)
        dropped[rows] = apply_capacity(index[rows], weights[rows], capacity, priority)
    return RoutingDecision(index, weights.masked_fill(dropped, 0.0), dropped, tuple(capacities))


@dataclass(frozen=True)
class TopK(Policy):
    """Send each token to its ``k`` highest-scoring experts (1 <= k <= E)."""

    k: int

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)

    @property
    def spec(self) -> str:
        return f"top-k:{self.k}"

    def experts_per_token(self, router: RouterSpec) -> int:
        return self.k

    def validate(self, router: RouterSpec) -> None:
        _check_k(self.k, router)
        if self.k != router.top_k:  # the model's own k is its native forward: allowed on every router
            super().validate(router)

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        if self.k == call.router.top_k:
            return None  # the native forward, bit for bit
        index, weights = top_k_routing(call, self.k)
        return RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))


@dataclass(frozen=True)
class Capacity(Policy):
    """Top-k routing with a per-expert capacity ``C = ceil(factor * T * k / E)`` per sequence.

    ``k`` defaults to the model's own k. ``priority`` decides who keeps a slot when an expert is
    over capacity: ``"position"`` fills every token's first choice in token order, then every
    second choice, and so on (GShard order); ``"probs"`` keeps the assignments with the highest
    gate weights first. Dropped assignments get weight 0; kept weights are not renormalised.
    In a batch, each sequence has its own capacity, so a batched run equals one run per prompt.
    """

    factor: float
    k: int | None = None
    priority: Literal["position", "probs"] = "position"

    recompute_when_generating: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise ValueError(f"factor must be a number; got {self.factor!r}")
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise ValueError(f"factor must be a finite number > 0; got {self.factor}")
        if self.k is not None:
            _check_int("k", self.k, 1)
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}; got {self.priority!r}")

    @property
    def spec(self) -> str:
        k = f":k={self.k}" if self.k is not None else ""
        return f"capacity:{self.factor:g}:{self.priority}{k}"

    @property
    def capacity_factor(self) -> float | None:
        return float(self.factor)

    def experts_per_token(self, router: RouterSpec) -> int:
        return self.k if self.k is not None else router.top_k

    def validate(self, router: RouterSpec) -> None:
        _check_k(self.k, router)
        if router.family == "native" and self.k in (None, router.top_k):
            return  # the router's own choice and weights are enough: nothing to re-compute
        super().validate(router)

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        k = self.experts_per_token(call.router)
        if call.router.substitutable:
            index, weights = top_k_routing(call, k)  # (N, k) each
        else:  # partial support: capacity on the router's own choice and weights
            assert call.native_index is not None and call.native_weights is not None
            index, weights = call.native_index.long(), call.native_weights.float()  # (N, k) each
        return capacity_decision(call, index, weights, [self.factor], self.priority)


@dataclass(frozen=True)
class Ensemble(Policy):
    """Every expert contributes for every token.

    ``"gate"`` weights expert i by the architecture's own weight rule applied to the set of all
    experts (softmax routers: the full softmax; top-k-then-softmax routers: the softmax over all E
    logits; sigmoid routers: the sigmoid scores, renormalised iff the model renormalises), times
    the architecture's scaling. ``"uniform"`` gives every expert ``scale / E``.
    """

    weighting: Literal["gate", "uniform"] = "gate"

    runs_every_expert: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")

    @property
    def spec(self) -> str:
        return f"ensemble:{self.weighting}"

    def experts_per_token(self, router: RouterSpec) -> int:
        return router.num_experts

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        N, E = call.logits.shape
        device = call.logits.device
        index = torch.arange(E, device=device).expand(N, E)  # (N, E)
        if self.weighting == "uniform":
            weights = torch.full((N, E), call.router.scale / E, device=device)
        else:
            weights = gate_weights(call.router, call.logits, index)  # (N, E)
        return RoutingDecision(index, weights, torch.zeros(N, E, dtype=torch.bool, device=device))


def route(
    spec: RouterSpec, logits: torch.Tensor, policy: Policy, selection_bias: torch.Tensor | None = None
) -> RoutingDecision:
    """Apply ``policy`` to one router's ``logits`` (T, E) outside any model: what the hooks do.

    A policy that keeps the native routing (``decide`` returns None) is answered with the
    re-implemented native top-k, so the result is always a decision.
    """
    check_policy(policy, spec)
    call = RouterCall(spec, logits, selection_bias)
    decision = policy.decide(call)
    if decision is None:
        index, weights = top_k_routing(call, spec.top_k)
        decision = RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))
    return decision


def policy_spec(policy: Policy | None) -> str:
    """The short text form of a policy (``"native"`` for ``None``), as the CLI accepts it."""
    return "native" if policy is None else policy.spec


def check_policy(policy: Policy | None, router: RouterSpec) -> None:
    """Raise ValueError if ``policy`` is not a policy or cannot run on ``router``."""
    if policy is None:
        return
    if not isinstance(policy, Policy):
        raise ValueError(
            f"policy must be None or a moe_viz.Policy (TopK, Capacity, Ensemble or a subclass); got {policy!r}"
        )
    policy.validate(router)


# ----------------------------------------------------------------------------- text form
PolicyParser = Callable[[list[str]], "Policy | None"]


def _parse_top_k(args: list[str]) -> Policy:
    if len(args) != 1:
        raise ValueError("top-k takes one value, K")
    return TopK(int(args[0]))


def _parse_capacity(args: list[str]) -> Policy:
    if not 1 <= len(args) <= 3:
        raise ValueError("capacity takes FACTOR[:position|probs][:k=K]")
    priority, k = "position", None
    for extra in args[1:]:
        if extra.startswith("k="):
            k = int(extra[2:])
        else:
            priority = extra
    return Capacity(float(args[0]), k=k, priority=priority)  # type: ignore[arg-type]


def _parse_ensemble(args: list[str]) -> Policy:
    if len(args) > 1:
        raise ValueError("ensemble takes one value, gate or uniform")
    return Ensemble(args[0] if args else "gate")  # type: ignore[arg-type]


# kind -> parser of the ':'-separated arguments. ``register_policy`` adds a kind.
POLICY_PARSERS: dict[str, PolicyParser] = {
    "top-k": _parse_top_k,
    "topk": _parse_top_k,
    "capacity": _parse_capacity,
    "ensemble": _parse_ensemble,
}
POLICY_SYNTAX = (
    "'native', 'top-k:K', 'capacity:FACTOR[:position|probs][:k=K]' or 'ensemble:gate|uniform', optionally followed "
    "by interventions such as '+ablate:LAYER:E,E[:zero]' or '+force:LAYER:E,E[@POS,POS]'"
)


# kind -> parser(args, base) of policies that wrap another one (interventions): read after a '+'.
CHAINABLE_PARSERS: dict[str, Callable[[list[str], Policy | None], Policy]] = {}


def register_policy(kind: str, parser: Callable[..., Policy | None], chainable: bool = False) -> None:
    """Make ``parse_policy`` read ``kind:ARG:ARG...`` with ``parser(args)`` (a user's own policy).

    A ``chainable`` parser takes ``(args, base)`` and wraps the policy before it in a ``+`` chain
    (``capacity:1.0+ablate:0:2,5``)."""
    if not isinstance(kind, str) or not kind or ":" in kind or "+" in kind or kind != kind.strip().lower():
        raise ValueError(f"kind must be a non-empty lower-case name without ':' or '+'; got {kind!r}")
    POLICY_PARSERS[kind] = parser
    if chainable:
        CHAINABLE_PARSERS[kind] = parser


def parse_policy(text: str) -> Policy | None:
    """Parse ``top-k:2``, ``capacity:1.25[:position|probs][:k=N]``, ``ensemble:gate|uniform``, ``native``
    (and any kind added with ``register_policy``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("policy must be a non-empty string such as 'top-k:2', 'capacity:1.25', 'ensemble:gate'")
    if "+" in text:  # a base policy, then interventions applied on top of it, left to right
        first, *rest = text.split("+")
        policy = parse_policy(first)
        for part in rest:
            kind, *args = [p.strip() for p in part.strip().lower().split(":")]
            chained = CHAINABLE_PARSERS.get(kind)
            if chained is None:
                raise ValueError(
                    f"policy {text!r}: only interventions ({', '.join(sorted(CHAINABLE_PARSERS)) or 'none'}) can "
                    f"follow '+'; got {kind!r}"
                )
            try:
                policy = chained(args, policy)
            except ValueError as err:
                raise ValueError(f"policy {text!r}: {err}") from None
        return policy
    parts = [p.strip() for p in text.strip().lower().split(":")]
    kind, args = parts[0], parts[1:]
    if kind == "native" and not args:
        return None
    parser = POLICY_PARSERS.get(kind)
    if parser is not None:
        try:
            return parser(args)
        except ValueError as err:
            raise ValueError(f"policy {text!r}: {err}") from None
    raise ValueError(f"policy {text!r} is not understood; use {POLICY_SYNTAX}")
