"""Routing policies: frozen values that say how tokens are sent to experts for one call.

A policy is passed per call (``run_prompt(model, prompt, TopK(1))``) and never written on the
model. ``None`` means "the model's own routing, recorded only".

* ``TopK(k)``: each token goes to its k best experts. ``k`` equal to the model's own k is the
  native mode and reproduces the model's forward exactly.
* ``Capacity(factor, k, priority)``: top-k, then each expert takes at most
  ``C = ceil(factor * T * k / E)`` assignments over the T tokens of the forward (Switch/GShard).
  Over-capacity assignments get weight 0 (the token rides the residual path, plus any shared
  expert); surviving weights are **not** renormalised.
* ``Ensemble(weighting)``: every expert runs for every token, weighted by the full router
  distribution ("gate") or by 1/E ("uniform").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

PRIORITIES = ("position", "probs")
WEIGHTINGS = ("gate", "uniform")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name} must satisfy {bound}; got {value}")
    return value


@dataclass(frozen=True)
class TopK:
    """Send each token to its ``k`` highest-scoring experts (1 <= k <= E)."""

    k: int

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)

    @property
    def spec(self) -> str:
        return f"top-k:{self.k}"


@dataclass(frozen=True)
class Capacity:
    """Top-k routing with a per-expert capacity ``C = ceil(factor * T * k / E)``.

    ``k`` defaults to the model's own k. ``priority`` decides who keeps a slot when an expert is
    over capacity: ``"position"`` fills every token's first choice in token order, then every
    second choice, and so on (GShard order); ``"probs"`` keeps the assignments with the highest
    gate weights first. Dropped assignments get weight 0; kept weights are not renormalised.
    """

    factor: float
    k: int | None = None
    priority: Literal["position", "probs"] = "position"

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


@dataclass(frozen=True)
class Ensemble:
    """Every expert contributes for every token.

    ``"gate"`` weights expert i by the architecture's own weight rule applied to the set of all
    experts (softmax routers: the full softmax; top-k-then-softmax routers: the softmax over all E
    logits; sigmoid routers: the sigmoid scores, renormalised iff the model renormalises), times
    the architecture's scaling. ``"uniform"`` gives every expert ``scale / E``.
    """

    weighting: Literal["gate", "uniform"] = "gate"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")

    @property
    def spec(self) -> str:
        return f"ensemble:{self.weighting}"


Policy = Union[TopK, Capacity, Ensemble]


def policy_spec(policy: Policy | None) -> str:
    """The short text form of a policy (``"native"`` for ``None``), as the CLI accepts it."""
    return "native" if policy is None else policy.spec


def check_policy(policy: Policy | None, num_experts: int) -> None:
    """Raise ValueError if ``policy`` cannot run on a layer with ``num_experts`` experts."""
    if policy is None:
        return
    if not isinstance(policy, (TopK, Capacity, Ensemble)):
        raise ValueError(f"policy must be TopK, Capacity, Ensemble or None; got {policy!r}")
    k = getattr(policy, "k", None)
    if k is not None and k > num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= {num_experts} (the number of experts); got {k}")


def parse_policy(text: str) -> Policy | None:
    """Parse ``top-k:2``, ``capacity:1.25[:position|probs][:k=N]``, ``ensemble:gate|uniform``, ``native``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("policy must be a non-empty string such as 'top-k:2', 'capacity:1.25', 'ensemble:gate'")
    parts = [p.strip() for p in text.strip().lower().split(":")]
    kind, args = parts[0], parts[1:]
    try:
        if kind == "native" and not args:
            return None
        if kind in ("top-k", "topk") and len(args) == 1:
            return TopK(int(args[0]))
        if kind == "capacity" and 1 <= len(args) <= 3:
            factor = float(args[0])
            priority, k = "position", None
            for extra in args[1:]:
                if extra.startswith("k="):
                    k = int(extra[2:])
                else:
                    priority = extra
            return Capacity(factor, k=k, priority=priority)  # type: ignore[arg-type]
        if kind == "ensemble" and len(args) <= 1:
            return Ensemble(args[0] if args else "gate")  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"policy {text!r}: {err}") from None
    raise ValueError(
        f"policy {text!r} is not understood; use 'native', 'top-k:K', "
        "'capacity:FACTOR[:position|probs][:k=K]' or 'ensemble:gate|uniform'"
    )
