"""Interventions: switch particular experts off or force them on, as policies that compose with
top-k, capacity and ensemble.

* ``Ablate(layer, experts, mode, base)``:
  - ``"reroute"``: the experts' logits are masked (-inf) before selection, so the next-best experts
    take their slots; the base policy then chooses and weights as the architecture does on the
    masked logits (a softmax router renormalises over the experts that remain).
  - ``"zero"``: the base policy's choice is kept and the ablated experts' weights are set to 0,
    not renormalised (the convention of editing gate weights by hand, as in nnsight).
* ``Force(layer, experts, positions, base)``: the tokens at ``positions`` (all when None) go to
  exactly ``experts`` in that layer, weighted by the architecture's own rule over that set.

Each wraps a ``base`` policy (None: the model's own top-k), so ``Capacity(1.0)`` with an ablation
is ``Ablate(0, (2, 5), base=Capacity(1.0))``; as text, ``capacity:1.0+ablate:0:2,5`` (``+`` chains
interventions onto a base, read left to right). ``parse_policy`` reads ``ablate:L:E,E[:zero]`` and
``force:L:E,E[@P,P]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from ._router_math import gate_weights
from ._routers import RouterSpec
from .policies import Policy, RouterCall, RoutingDecision, register_policy, top_k_routing

ABLATION_MODES = ("reroute", "zero")


def _experts(name: str, experts: object) -> tuple[int, ...]:
    if isinstance(experts, int) and not isinstance(experts, bool):
        experts = (experts,)
    if not isinstance(experts, (tuple, list)) or not experts:
        raise ValueError(f"{name} must be a non-empty list of expert ids; got {experts!r}")
    ids = tuple(experts)
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{name} must be distinct expert ids >= 0; got {list(ids)}")
    return ids


def _layer(layer: object) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a decoder-layer index >= 0; got {layer!r}")
    return layer


def _base_decision(base: Policy | None, call: RouterCall) -> RoutingDecision:
    """The base policy's decision, with the native top-k spelled out when it keeps the model's own."""
    decision = base.decide(call) if base is not None else None
    if decision is None:
        index, weights = top_k_routing(call, call.router.top_k)
        decision = RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))
    return decision


@dataclass(frozen=True)
class _Intervention(Policy):
    layer: int
    experts: tuple[int, ...]
    base: Policy | None

    @property
    def layers(self) -> frozenset[int] | None:
        inner = self.base.layers if self.base is not None else None
        return frozenset({self.layer} | set(inner or ()))

    @property
    def capacity_factor(self) -> float | None:
        return self.base.capacity_factor if self.base is not None else None

    def experts_per_token(self, router: RouterSpec) -> int:
        return self.base.experts_per_token(router) if self.base is not None else router.top_k

    @property
    def recompute_when_generating(self) -> bool:  # type: ignore[override]
        return bool(self.base is not None and self.base.recompute_when_generating)

    def validate(self, router: RouterSpec) -> None:
        if self.base is not None:
            self.base.validate(router)
        Policy.validate(self, router)  # interventions re-compute the routing: the maths must be proven
        if max(self.experts) >= router.num_experts:
            raise ValueError(
                f"experts must satisfy 0 <= expert < {router.num_experts} (the number of experts); "
                f"got {max(self.experts)}"
            )

    def _prefix(self) -> str:
        return "" if self.base is None else self.base.spec + "+"


@dataclass(frozen=True)
class Ablate(_Intervention):
    """Switch ``experts`` of ``layer`` off ("reroute": masked before selection; "zero": weight 0)."""

    base: Policy | None = None
    mode: Literal["reroute", "zero"] = "reroute"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _layer(self.layer))
        object.__setattr__(self, "experts", _experts("experts", self.experts))
        if self.mode not in ABLATION_MODES:
            raise ValueError(f"mode must be one of {ABLATION_MODES}; got {self.mode!r}")

    @property
    def spec(self) -> str:
        mode = ":zero" if self.mode == "zero" else ""
        return f"{self._prefix()}ablate:{self.layer}:{','.join(map(str, self.experts))}{mode}"

    def validate(self, router: RouterSpec) -> None:
        super().validate(router)
        if self.mode == "reroute" and router.num_experts - len(self.experts) < self.experts_per_token(router):
            raise ValueError(
                f"ablating {len(self.experts)} of {router.num_experts} experts leaves fewer than the "
                f"{self.experts_per_token(router)} each token needs; ablate at most "
                f"{router.num_experts - self.experts_per_token(router)}"
            )

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        if call.layer != self.layer:
            return self.base.decide(call) if self.base is not None else None
        ablated = torch.tensor(self.experts, device=call.logits.device)
        if self.mode == "zero":
            decision = _base_decision(self.base, call)
            hit = torch.isin(decision.index, ablated)  # (N, k')
            return replace(decision, weights=decision.weights.masked_fill(hit, 0.0))
        masked = call.logits.float().clone()  # (N, E)
        masked[:, ablated] = float("-inf")
        return _base_decision(self.base, replace(call, logits=masked))


@dataclass(frozen=True)
class Force(_Intervention):
    """Send the tokens at ``positions`` (all when None) to exactly ``experts`` in ``layer``."""

    base: Policy | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _layer(self.layer))
        object.__setattr__(self, "experts", _experts("experts", self.experts))
        if self.positions is not None:
            object.__setattr__(self, "positions", _experts("positions", self.positions))

    @property
    def recompute_when_generating(self) -> bool:  # type: ignore[override]
        # positions count from the start of the sequence: a cached decode step would not know them
        return self.positions is not None or super().recompute_when_generating

    @property
    def spec(self) -> str:
        where = "" if self.positions is None else "@" + ",".join(map(str, self.positions))
        return f"{self._prefix()}force:{self.layer}:{','.join(map(str, self.experts))}{where}"

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        if call.layer != self.layer:
            return self.base.decide(call) if self.base is not None else None
        N = call.num_tokens
        forced = torch.tensor(self.experts, device=call.logits.device).expand(N, len(self.experts))  # (N, f)
        weights = gate_weights(call.router, call.logits, forced)  # (N, f) the architecture's rule over the set
        if self.positions is None:
            return RoutingDecision(forced.clone(), weights, torch.zeros_like(forced, dtype=torch.bool))
        # only some positions: the others keep the base routing; pad both to one width
        base = _base_decision(self.base, call)
        rows = torch.zeros(N, dtype=torch.bool, device=call.logits.device)
        for seq in call.sequences():
            picked = [seq[p] for p in self.positions if p < len(seq)]
            if picked:
                rows[torch.stack(picked)] = True
        width = max(base.index.shape[1], len(self.experts))
        index = torch.zeros(N, width, dtype=torch.long, device=forced.device)
        out_w = torch.zeros(N, width, dtype=torch.float32, device=forced.device)
        dropped = torch.zeros(N, width, dtype=torch.bool, device=forced.device)
        k = base.index.shape[1]
        index[:, :k], out_w[:, :k], dropped[:, :k] = base.index, base.weights.float(), base.dropped
        index[rows, : len(self.experts)] = forced[rows]
        out_w[rows] = 0.0
        out_w[rows, : len(self.experts)] = weights[rows]
        dropped[rows] = False
        if width > k:  # padding slots of unforced rows: a real expert id with weight 0
            index[~rows, k:] = base.index[~rows, :1]
        return RoutingDecision(index, out_w, dropped, base.capacity)


# ----------------------------------------------------------------------------- text form
def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip() != "")
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers; got {text!r}") from None


def parse_ablate(args: list[str], base: Policy | None = None) -> Policy:
    if len(args) not in (2, 3):
        raise ValueError("ablate takes LAYER:EXPERT,EXPERT[:zero|reroute]")
    mode = args[2] if len(args) == 3 else "reroute"
    return Ablate(int(args[0]), _ints(args[1], "experts"), base=base, mode=mode)  # type: ignore[arg-type]


def parse_force(args: list[str], base: Policy | None = None) -> Policy:
    if len(args) != 2:
        raise ValueError("force takes LAYER:EXPERT,EXPERT[@POSITION,POSITION]")
    experts, _, positions = args[1].partition("@")
    where = _ints(positions, "positions") if positions else None
    return Force(int(args[0]), _ints(experts, "experts"), base=base, positions=where)


INTERVENTIONS = {"ablate": parse_ablate, "force": parse_force}
for _kind, _parser in INTERVENTIONS.items():
    register_policy(_kind, _parser, chainable=True)
