"""Router hooks, installed once per model, that read each call's policy from a ContextVar.

``instrument(model)`` registers, when the model loads, one forward hook per router plus a pre-
and post-hook on the model itself. A call runs inside ``active_call(policy)``: the policy and a
fresh ``Recorder`` live in a ``contextvars.ContextVar``, so two threads (two browser sessions)
sharing one cached model each see only their own policy and records. Nothing is written on the
model per call.

The model's pre-hook starts a new forward in the recorder and notes which sequence each token
row belongs to (from the attention mask), so policies can count capacity per sequence in a
padded batch. Each router hook hands the policy a ``RouterCall`` and returns a replacement
``(logits, weights, index, *rest)`` tuple; the block code after the router (shared experts,
scaling, norms) runs unchanged. A dropped assignment keeps its index and gets weight 0: a
sentinel index breaks the ``grouped_mm`` and ``batched_mm`` experts kernels.
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

from ._routers import RouterSite, RouterSpec, find_routers
from .policies import Policy, RouterCall, check_policy


@dataclass
class LayerCall:
    """What one router saw and did in one forward (tensors on the model's device)."""

    layer: int
    logits: torch.Tensor  # (N, E)
    native_index: torch.Tensor | None  # (N, k); None when the layout does not expose it
    native_weights: torch.Tensor | None  # (N, k)
    index: torch.Tensor | None = None  # (N, k') applied; None = native
    weights: torch.Tensor | None = None  # (N, k')
    dropped: torch.Tensor | None = None  # (N, k')
    capacity: tuple[int, ...] | None = None  # per sequence of the forward


@dataclass
class Forward:
    """One forward of the model inside a call: its inputs, outputs and router calls."""

    input_ids: torch.Tensor | None = None  # (B, T)
    attention_mask: torch.Tensor | None = None  # (B, T) for this forward's tokens
    logits: torch.Tensor | None = None  # (B, T, V)
    layers: list[LayerCall] = field(default_factory=list)
    groups: torch.Tensor | None = None  # (B*T,) sequence of each token row, -1 = padding; None = one sequence


def _token_groups(input_ids: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B*T,) the sequence each token row belongs to, -1 for padding; None for one unpadded sequence."""
    if mask is None:
        if input_ids is None or input_ids.shape[0] == 1:
            return None
        B, T = input_ids.shape
        return torch.arange(B, device=input_ids.device).repeat_interleave(T)
    if mask.shape[0] == 1 and bool(mask.all()):
        return None
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)  # (B, T)
    return rows.masked_fill(mask == 0, -1).reshape(-1)  # (B*T,)


@dataclass
class Recorder:
    """Collects the ``Forward``s of one call, in order."""

    forwards: list[Forward] = field(default_factory=list)

    def start_forward(self, forward: Forward | None = None) -> Forward:
        self.forwards.append(forward or Forward())
        return self.forwards[-1]

    @property
    def current(self) -> Forward:
        return self.forwards[-1] if self.forwards else self.start_forward()


class TimeBudgetExceeded(RuntimeError):
    """A call ran past its time budget; raised between MoE layers so the forward stops early."""


@dataclass
class _Active:
    """The state of one call, private to its context (thread)."""

    policy: Policy | None
    recorder: Recorder
    deadline: float | None = None  # time.monotonic() value
    budget_s: float | None = None
    keep_logits: bool = False  # keep each forward's output logits (``record`` builds traces from them)
    token_mask: torch.Tensor | None = None  # (B, T) 1 = real token, for forwards given no attention mask


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("moe_viz_active_call", default=None)


@contextmanager
def active_call(
    policy: Policy | None = None,
    time_budget_s: float | None = None,
    keep_logits: bool = False,
    token_mask: torch.Tensor | None = None,
) -> Iterator[Recorder]:
    """Run the model calls inside the block under ``policy``; yields their recorder.

    ``token_mask`` (B, T) marks the real tokens of right-padded input that is run without an
    attention mask (causal attention never lets a real token see the padding after it).

    With ``time_budget_s``, a forward still running when the budget is spent raises
    ``TimeBudgetExceeded`` at its next MoE layer.
    """
    recorder = Recorder()
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    token = _ACTIVE.set(_Active(policy, recorder, deadline, time_budget_s, keep_logits, token_mask))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def check_deadline() -> None:
    """Raise ``TimeBudgetExceeded`` if the current call's time budget is spent."""
    active = _ACTIVE.get()
    if active is not None and active.deadline is not None and time.monotonic() > active.deadline:
        raise TimeBudgetExceeded(f"the request ran past its time budget of {active.budget_s:g} s and was stopped")


def _read_output(spec: RouterSpec, output: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, native weights, native index) from a router's output, per layout."""
    if spec.layout == "logits_only":
        return output, None, None
    if spec.layout == "scores_logits":
        return output[1], None, None
    if spec.layout == "jetmoe":
        return output[4], None, None
    return output[0], output[1], output[2]


def _model_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Start a new forward in the active recorder, noting its token ids and padding."""
    active = _ACTIVE.get()
    if active is None:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = active.token_mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(ids, torch.Tensor):
        mask = mask[:, -ids.shape[1] :]  # with a KV cache the mask also covers the past tokens
    else:
        mask = None
    ids = ids if isinstance(ids, torch.Tensor) else None
    active.recorder.start_forward(Forward(input_ids=ids, attention_mask=mask, groups=_token_groups(ids, mask)))


def _model_post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    active = _ACTIVE.get()
    if active is not None and active.keep_logits and active.recorder.forwards:
        logits = getattr(output, "logits", None)
        active.recorder.current.logits = logits.detach() if isinstance(logits, torch.Tensor) else None


class _RouterHook:
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
        logits = logits.detach().reshape(-1, spec.num_experts)  # (N, E)
        if native_idx is not None and native_w is not None:
            native_idx, native_w = native_idx.reshape(len(logits), -1), native_w.reshape(len(logits), -1)
        call = LayerCall(self.site.layer, logits, native_idx, native_w)
        forward = active.recorder.current
        forward.layers.append(call)
        if active.policy is None:
            return None
        router_call = RouterCall(spec, logits, spec.selection_bias(module), native_idx, native_w, forward.groups)
        decision = active.policy.decide(router_call)
        if decision is None:
            return None
        call.index, call.weights, call.dropped, call.capacity = (
            decision.index,
            decision.weights,
            decision.dropped,
            decision.capacity,
        )
        native_w, native_idx = output[1], output[2]
        shape = (*native_idx.shape[:-1], decision.index.shape[-1])
        new_index = decision.index.to(native_idx.dtype).reshape(shape)
        new_weights = decision.weights.to(native_w.dtype).reshape(shape)
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
        for site in self.sites:
            try:
                check_policy(policy, site.spec)
            except ValueError as err:
                raise ValueError(f"{err} [router {site.router_class} at {site.path}]") from None


def instrument(model: nn.Module) -> Instrumentation:
    """Install the model's pre/post hooks and one forward hook per router (once, at load)."""
    found = find_routers(model)
    handles = [module.register_forward_hook(_RouterHook(site)) for module, site in found]
    if found:
        handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(_model_post_hook, with_kwargs=True))
    return Instrumentation(sites=tuple(site for _, site in found), handles=tuple(handles))
