"""Router hooks, installed once per model, that read each call's policy from a ContextVar.

``instrument(model)`` registers one forward hook per router when the model loads. A call runs
``with routing(policy) as recorder: model(...)``: the policy and a fresh recorder live in a
``contextvars.ContextVar``, so two threads (two browser sessions) sharing one cached model each see
only their own policy and records. Nothing is written on the model per call.

The hook returns a replacement ``(logits, weights, index, *rest)`` tuple; the block code after the
router (shared experts, scaling, norms) runs unchanged. A dropped assignment keeps its index and
gets weight 0: a sentinel index breaks the ``grouped_mm`` and ``batched_mm`` experts kernels.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import RouterSite, RouterSpec, find_routers
from .policies import Policy, TopK, check_policy
from .routing import route


@dataclass
class LayerCall:
    """What one router saw and did in one forward (tensors on the model's device)."""

    layer: int
    logits: torch.Tensor  # (T, E)
    native_index: torch.Tensor | None  # (T, k); None when the layout does not expose it
    native_weights: torch.Tensor | None  # (T, k)
    index: torch.Tensor | None = None  # (T, k') applied; None = native
    weights: torch.Tensor | None = None  # (T, k')
    dropped: torch.Tensor | None = None  # (T, k')
    capacity: int | None = None


@dataclass
class Recorder:
    """Collects ``LayerCall``s, grouped by forward pass, for one call of ``routing``."""

    forwards: list[list[LayerCall]] = field(default_factory=list)

    def start_forward(self) -> None:
        self.forwards.append([])

    def add(self, call: LayerCall) -> None:
        if not self.forwards:
            self.forwards.append([])
        self.forwards[-1].append(call)


class TimeBudgetExceeded(RuntimeError):
    """A call ran past its time budget; raised between MoE layers so the forward stops early."""


@dataclass(frozen=True)
class _Active:
    policy: Policy | None
    recorder: Recorder | None
    deadline: float | None = None  # time.monotonic() value
    budget_s: float | None = None


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("moe_viz_routing", default=None)


@contextmanager
def routing(
    policy: Policy | None = None, record: bool = True, time_budget_s: float | None = None
) -> Iterator[Recorder | None]:
    """Run the model calls inside the block under ``policy``; yields the recorder (or None).

    With ``time_budget_s``, a forward still running when the budget is spent raises
    ``TimeBudgetExceeded`` at its next MoE layer.
    """
    recorder = Recorder() if record else None
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    token = _ACTIVE.set(_Active(policy, recorder, deadline, time_budget_s))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def _read_output(spec: RouterSpec, output: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, native weights, native index) from a router's output, per layout."""
    if spec.layout == "logits_only":
        return output, None, None
    if spec.layout == "scores_logits":
        return output[1], None, None
    if spec.layout == "jetmoe":
        return output[4], None, None
    return output[0], output[1], output[2]


def check_deadline() -> None:
    """Raise ``TimeBudgetExceeded`` if the current call's time budget is spent."""
    active = _ACTIVE.get()
    if active is not None and active.deadline is not None and time.monotonic() > active.deadline:
        raise TimeBudgetExceeded(f"the request ran past its time budget of {active.budget_s:g} s and was stopped")


class _Hook:
    """The forward hook of one router. Reads the call's policy; never writes to the model."""

    def __init__(self, site: RouterSite) -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        active = _ACTIVE.get()
        if active is None:
            return None
        check_deadline()
        spec = self.site.spec
        logits, native_w, native_idx = _read_output(spec, output)
        policy = active.policy
        passthrough = policy is None or (isinstance(policy, TopK) and policy.k == spec.top_k)
        logits = logits.detach().reshape(-1, spec.num_experts)  # (T, E)
        if native_idx is not None and native_w is not None:
            native_idx, native_w = native_idx.reshape(len(logits), -1), native_w.reshape(len(logits), -1)
        call = LayerCall(self.site.layer, logits, native_idx, native_w)
        if not passthrough:
            assert policy is not None
            decided = route(spec, logits, policy, spec.selection_bias(module))
            call.index, call.weights, call.dropped, call.capacity = (
                decided.index,
                decided.weights,
                decided.dropped,
                decided.capacity,
            )
        if active.recorder is not None:
            active.recorder.add(call)
        if passthrough:
            return None
        assert call.index is not None and call.weights is not None
        native_w, native_idx = output[1], output[2]
        shape = (*native_idx.shape[:-1], call.index.shape[-1])
        new_index = call.index.to(native_idx.dtype).reshape(shape)
        new_weights = call.weights.to(native_w.dtype).reshape(shape)
        return (output[0], new_weights, new_index, *output[3:])


@dataclass
class Instrumentation:
    """The hooks installed on one model, and the router sites they watch."""

    sites: tuple[RouterSite, ...]
    handles: tuple[Any, ...]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def check(self, policy: Policy | None) -> None:
        """Raise ValueError if ``policy`` cannot run on every router of this model."""
        if policy is None:
            return
        capture_only = [s for s in self.sites if not s.spec.substitutable]
        if capture_only and not (isinstance(policy, TopK) and all(policy.k == s.spec.top_k for s in self.sites)):
            names = ", ".join(sorted({s.router_class for s in capture_only}))
            raise ValueError(
                f"policy {policy.spec!r} cannot run on this model: its routers ({names}) are capture-only; "
                "only the native routing (policy None) is recorded"
            )
        for site in self.sites:
            check_policy(policy, site.spec.num_experts)


def instrument(model: nn.Module) -> Instrumentation:
    """Install one forward hook per router of ``model`` (once, at load). Raises if it has none."""
    found = find_routers(model)
    handles = tuple(module.register_forward_hook(_Hook(site)) for module, site in found)
    return Instrumentation(sites=tuple(site for _, site in found), handles=handles)
