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

Where the model's output head was proven plain at load (``_output_head``), a hook on the base
model keeps its final hidden states for a call that asks (``keep_hidden``): ``run_prompt`` then
has the model project only the last row and projects other rows when they are read.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._output_head import OutputHead, find_output_head, last_hidden_state
from ._router_inference import Verification, calibrate, calibration_ids, describe, experts_choice, infer
from ._routers import (
    RouterSite,
    RouterSpec,
    find_routers,
    in_layer_with_shared_expert,
    is_attention_path,
    jetmoe_output,
    layer_of,
    read_router_output,
    shared_expert_layers,
)
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
    held_native: bool = False  # the policy could not run on this router: native routing kept


@dataclass
class Forward:
    """One forward of the model inside a call: its inputs, outputs and router calls."""

    input_ids: torch.Tensor | None = None  # (B, T)
    attention_mask: torch.Tensor | None = None  # (B, T) for this forward's tokens
    logits: torch.Tensor | None = None  # (B, T, V)
    hidden: torch.Tensor | None = None  # (B, T, H) the base model's output, which the output head projects
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


# probe(site, router module, parent block, router args, router kwargs, logits (N, E)) -> None
RouterProbe = Callable[[RouterSite, nn.Module, "nn.Module | None", tuple[Any, ...], dict[str, Any], torch.Tensor], None]


@dataclass
class _Active:
    """The state of one call, private to its context (thread)."""

    policy: Policy | None
    recorder: Recorder
    deadline: float | None = None  # time.monotonic() value
    budget_s: float | None = None
    keep_logits: bool = False  # keep each forward's output logits (``record`` builds traces from them)
    keep_hidden: bool = False  # keep each forward's final hidden states (a run projects the rows it reads)
    token_mask: torch.Tensor | None = None  # (B, T) 1 = real token, for forwards given no attention mask
    probe: RouterProbe | None = None  # called at every router with its input (fragility measurements)


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("moe_viz_active_call", default=None)


@contextmanager
def active_call(
    policy: Policy | None = None,
    time_budget_s: float | None = None,
    keep_logits: bool = False,
    token_mask: torch.Tensor | None = None,
    probe: RouterProbe | None = None,
    keep_hidden: bool = False,
) -> Iterator[Recorder]:
    """Run the model calls inside the block under ``policy``; yields their recorder.

    ``probe(site, router, parent, args, kwargs, logits)`` is called at every router before the
    policy decides, with the router's own input: it may run ``router.forward`` again on a changed
    input (that call fires no hook) to measure what the router would do, but it must not change
    the forward (``fragility.noise_sensitivity`` uses it).

    ``keep_hidden`` keeps each forward's final hidden states (``Forward.hidden``), where the
    model's output head was proven plain at load (``Instrumentation.head``).

    ``token_mask`` (B, T) marks the real tokens of right-padded input that is run without an
    attention mask (causal attention never lets a real token see the padding after it).

    With ``time_budget_s``, a forward still running when the budget is spent raises
    ``TimeBudgetExceeded`` at its next MoE layer.
    """
    recorder = Recorder()
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    token = _ACTIVE.set(_Active(policy, recorder, deadline, time_budget_s, keep_logits, keep_hidden, token_mask, probe))
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def check_deadline() -> None:
    """Raise ``TimeBudgetExceeded`` if the current call's time budget is spent."""
    active = _ACTIVE.get()
    if active is not None:
        _check_deadline(active)


def _check_deadline(active: _Active) -> None:
    if active.deadline is not None and time.monotonic() > active.deadline:
        raise TimeBudgetExceeded(f"the request ran past its time budget of {active.budget_s:g} s and was stopped")


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


def _base_model_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    active = _ACTIVE.get()
    if active is not None and active.keep_hidden and active.recorder.forwards:
        active.recorder.current.hidden = last_hidden_state(output)


def _not_rows(shape: torch.Size, rows: int) -> bool:
    """Whether a tensor of ``shape`` is not already (rows, k)."""
    return len(shape) != 2 or shape[0] != rows


class _RouterHook:
    """The forward hook of one router. Reads the call's policy; never writes to the model."""

    def __init__(self, site: RouterSite, parent: nn.Module | None) -> None:
        self.site = site
        self.parent = parent
        self._runs: dict[str, bool] = {}  # policy spec -> whether this router can run it (checked once)

    def _can_run(self, policy: Policy) -> bool:
        key = policy.spec
        if key not in self._runs:
            try:
                policy.validate(self.site.spec)
                self._runs[key] = True
            except ValueError:
                self._runs[key] = False
        return self._runs[key]

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        active = _ACTIVE.get()
        if active is None:
            return None
        if active.deadline is not None:
            _check_deadline(active)
        spec = self.site.spec
        logits, native_w, native_idx = read_router_output(spec.layout, output, spec.top_k)
        # Views only where needed: every new view costs time in each router of each forward, and
        # most routers already return (N, E) / (N, k) tensors outside autograd.
        if logits.requires_grad:
            logits = logits.detach()
        shape = logits.shape
        if len(shape) != 2 or shape[1] != spec.num_experts:
            logits = logits.reshape(-1, spec.num_experts)  # (N, E)
        if native_idx is not None and native_w is not None:
            N = len(logits)
            if _not_rows(native_idx.shape, N):
                native_idx = native_idx.reshape(N, -1)  # (N, k)
            if _not_rows(native_w.shape, N):
                native_w = native_w.reshape(N, -1)  # (N, k)
        call = LayerCall(self.site.layer, logits, native_idx, native_w)
        forward = active.recorder.current
        forward.layers.append(call)
        if active.probe is not None:
            active.probe(self.site, module, self.parent, args, kwargs, logits)
        if active.policy is None:
            return None
        if not self._can_run(active.policy):
            call.held_native = True  # this router cannot run the policy: its layer keeps native routing
            return None
        bias = spec.selection_bias(module, self.parent, (*args[1:], *kwargs.values()))
        router_call = RouterCall(spec, logits, bias, native_idx, native_w, forward.groups, self.site.layer)
        decision = active.policy.decide(router_call)
        if decision is None:
            return None
        call.index, call.weights, call.dropped, call.capacity = (
            decision.index,
            decision.weights,
            decision.dropped,
            decision.capacity,
        )
        if spec.layout == "logits_experts":  # DBRX: the experts seam hands the experts this decision
            return None
        if spec.layout == "jetmoe":  # sorted dispatch, rebuilt from the decision
            return jetmoe_output(decision.index, decision.weights, output[4], output)
        if spec.layout == "scores_logits":  # Llama 4: a dense score matrix, 0 off the chosen experts
            scores = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)  # (N, E)
            scores.scatter_(1, decision.index, decision.weights.float())
            return (scores.to(output[0].dtype).reshape(output[0].shape), *output[1:])
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
    head: OutputHead | None = None  # the output head, where proven plain (``_output_head``)
    head_reason: str = ""  # why not, otherwise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def check(self, policy: Policy | None) -> None:
        """Raise ValueError if ``policy`` is invalid, or cannot run on any router of this model.

        A policy that some routers can run and others cannot (a model mixing verified routers with
        hash-routed or unproven ones, such as DeepSeek-V4) runs where it can; the other layers keep
        their native routing and their traces say so (``LayerTrace.held_native``)."""
        if policy is None:  # native routing: every router runs it
            return
        errors = []
        for site in self.sites:
            try:
                check_policy(policy, site.spec)
            except ValueError as err:
                why = getattr(site.verification, "reason", "")
                errors.append(f"{err} [router {site.router_class} at {site.path}{': ' + why if why else ''}]")
        if errors and (len(errors) == len(self.sites) or not isinstance(policy, Policy)):
            raise ValueError(errors[0])
        named = policy.layers if isinstance(policy, Policy) else None
        missing = sorted(set(named or ()) - {site.layer for site in self.sites})
        if missing:
            raise ValueError(
                f"policy {policy.spec!r} names layer {missing[0]}, which is not an MoE layer of this model; "
                f"the MoE layers are {sorted({site.layer for site in self.sites})}"
            )


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None


def discover_and_verify(model: nn.Module, tokenizer: Any) -> list[tuple[nn.Module, RouterSite]]:
    """Every router of ``model`` with a verified spec: routers of known classes, plus any module
    whose output is the standard ``(logits, weights, index)``; each spec proved against the router's
    own outputs on calibration inputs (``_router_inference``), or partial / capture-only with the reason."""
    known = find_routers(model)
    known_ids = {id(module) for module, _ in known}
    modules = [(path, m) for path, m in model.named_modules() if path and not is_attention_path(path)]
    layouts = {id(module): (site.spec.layout, site.spec.top_k) for module, site in known}
    seams = {id(module): experts_module(model, site) for module, site in known if site.spec.layout == "logits_experts"}
    observations = calibrate(model, tokenizer, [m for _, m in modules], layouts, seams)
    shared = shared_expert_layers(model)
    found = list(known)
    for path, module in modules:
        if id(module) in known_ids or id(module) not in observations:
            continue
        obs = observations[id(module)]
        E, k = int(obs.logits[0].shape[-1]), int(obs.index[0].shape[-1])
        layer = layer_of(path)
        site = RouterSite(
            path=path,
            layer=len(found) if layer is None else layer,
            spec=RouterSpec("capture", num_experts=E, top_k=k),
            router_class=type(module).__name__,
            shared_expert=in_layer_with_shared_expert(path, shared),
        )
        found.append((module, site))
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    verified = []
    for module, site in found:
        obs = observations.get(id(module))
        if site.spec.exposes_native and obs is not None:
            known_spec = site.spec if id(module) in known_ids else None
            spec, verification = infer(module, _parent(model, site.path), text_config, obs, known_spec)
            site = replace(site, spec=replace(spec, layout=site.spec.layout), verification=verification)
        else:
            reason = (
                f"{site.router_class} does not return the standard (logits, weights, index): moe-viz records its "
                "choice but has no verified re-implementation of it, so only native routing runs"
            )
            site = replace(site, verification=Verification("capture", describe(site.spec), reason=reason))
        verified.append((module, site))
    verified.sort(key=lambda item: item[1].layer)
    return verified


def experts_module(model: nn.Module, site: RouterSite) -> nn.Module:
    """The experts module a logits-only router's block calls with the chosen (index, weights)."""
    parent = _parent(model, site.path)
    experts = getattr(parent, "experts", None)
    if not isinstance(experts, nn.Module):
        raise ValueError(f"router {site.path} returns logits only and its block has no experts module to read")
    return experts


class _ExpertsSeam:
    """A pre-hook on the experts of a block that picks top-k itself (DBRX): it reads the block's own
    choice (the native routing) and, under a policy, hands the experts the policy's choice instead."""

    def __init__(self, site: RouterSite) -> None:
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        active = _ACTIVE.get()
        if active is None or not active.recorder.forwards:
            return None
        calls = [c for c in active.recorder.current.layers if c.layer == self.site.layer]
        if not calls:
            return None
        call = calls[-1]
        index, weights = experts_choice(args, kwargs)
        N = call.logits.shape[0]
        call.native_index, call.native_weights = index.reshape(N, -1), weights.reshape(N, -1)
        if call.index is None or call.weights is None:
            return None
        new_index = call.index.to(index.dtype).reshape(*index.shape[:-1], call.index.shape[-1])
        new_weights = call.weights.to(weights.dtype).reshape(*weights.shape[:-1], call.weights.shape[-1])
        if "top_k_index" in kwargs:
            return args, {**kwargs, "top_k_index": new_index, "top_k_weights": new_weights}
        return (args[0], new_index, new_weights, *args[3:]), kwargs


def instrument(model: nn.Module, tokenizer: Any = None) -> Instrumentation:
    """Find and verify every router (``discover_and_verify``), then install the model's pre/post
    hooks and one forward hook per router (once, at load); where the output head is proven plain
    (``find_output_head``), a hook on the base model keeps the final hidden states a call asks for."""
    found = discover_and_verify(model, tokenizer)
    handles = [
        module.register_forward_hook(_RouterHook(site, _parent(model, site.path)), with_kwargs=True)
        for module, site in found
    ]
    handles += [
        experts_module(model, site).register_forward_pre_hook(_ExpertsSeam(site), with_kwargs=True)
        for _, site in found
        if site.spec.layout == "logits_experts"
    ]
    head, why = None, "the model has no MoE layers"
    if found:
        handles.append(model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(_model_post_hook, with_kwargs=True))
        head, why = find_output_head(model, calibration_ids(model, tokenizer))
        if head is not None:
            handles.append(head.base.register_forward_hook(_base_model_hook))
    return Instrumentation(sites=tuple(site for _, site in found), handles=tuple(handles), head=head, head_reason=why)
