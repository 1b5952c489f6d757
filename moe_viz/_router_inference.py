"""The router is its own oracle: infer how a router turns logits into experts and weights, and
prove it against the router's own outputs when the model loads.

For every router with the standard ``(logits, weights, index)`` output, ``calibrate`` records
what it returned on a real forward of a short text and on random inputs of the same scale. A
small grammar of specs (scoring: softmax, sigmoid, top-k of the logits then softmax;
renormalisation: none or sum, clamped where the router says so; scaling: read from the router or
its config, or solved from the outputs; a selection-only bias found on the router or its parent
block; group limits read from the router or config) is checked against those records with
moe-viz's own router maths. A spec is adopted only when it picks the same experts for every
recorded token and gives the same weights within a dtype-aware tolerance. Specs that agree on
every policy (softmax + renormalise = top-k then softmax) count as one: the first that matches
wins. When none matches, the router keeps *partial* support (its native choice and weights, so
capacity at its own k still works) and the reason names the closest candidate.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ._router_math import gate_weights, select_topk
from ._routers import RouterSpec, read_router_output

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
RANDOM_ROWS = 32  # random router inputs per router, on top of the real forward's tokens
SCALE_NAMES = ("routed_scaling_factor", "route_scale", "routed_scale", "scaling_factor")
GROUP_NAMES = (("n_group", "num_group", "num_expert_group", "n_expert_groups"), ("topk_group", "topk_groups"))


@dataclass
class Observation:
    """What one router returned on calibration inputs: logits (N, E), its weights and index (N, k)."""

    logits: list[torch.Tensor]
    weights: list[torch.Tensor]
    index: list[torch.Tensor]
    bias_args: tuple[torch.Tensor, ...] = ()  # (E,) tensors passed to the router's forward

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.cat([x.float().cpu() for x in self.logits])  # (N, E)
        weights = torch.cat([x.float().cpu() for x in self.weights])  # (N, k)
        index = torch.cat([x.long().cpu() for x in self.index])  # (N, k)
        return logits, weights, index


@dataclass(frozen=True)
class Verification:
    """How a router's spec was established: the outcome shown by ``moe-viz inspect`` and the app."""

    status: str  # "verified" | "partial" | "capture"
    spec_text: str  # the adopted (or closest) spec in words
    tokens_checked: int = 0
    max_weight_diff: float = float("nan")
    index_agreement: float = float("nan")  # share of tokens whose expert set matched
    reason: str = ""  # why other policies are refused (partial / capture)
    source: str = ""  # "known class" | "inferred" | ""


def describe(spec: RouterSpec) -> str:
    """A spec in words, e.g. 'sigmoid, bias, groups 4→2 (top2sum), renorm, ×2.5'."""
    if spec.family == "capture":
        return "not reproduced (capture-only)"
    if spec.family == "native":
        return "native choice and weights only"
    parts = {
        "softmax": ["softmax"],
        "topk_softmax": ["top-k of logits, then softmax"],
        "sigmoid": ["sigmoid"],
        "sqrtsoftplus": ["sqrt(softplus)"],
        "sparsemixer": [f"sparsemixer (threshold {spec.jitter_eps or 0.0:g})"],
    }[spec.family]
    if spec.bias_path:
        parts.append(f"selection bias `{spec.bias_path}`" + (" on the logits" if spec.bias_on == "logits" else ""))
    if spec.group_limit is not None:
        parts.append(f"groups {spec.n_group}→{spec.topk_group} ({spec.group_score})")
    if spec.family not in ("topk_softmax", "sparsemixer"):
        parts.append(
            "renormalised" + (f" (min {spec.norm_min:g})" if spec.norm_min is not None else "")
            if spec.renorm
            else "not renormalised"
        )
    if spec.scale != 1.0:
        parts.append(f"× {spec.scale:g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- calibration
def _looks_like_std_output(output: Any) -> tuple[int, int] | None:
    """(E, k) when ``output`` is ``(logits (N, E), weights (N, k), index (N, k) long, ...)``."""
    if not isinstance(output, (tuple, list)) or len(output) < 3:
        return None
    logits, weights, index = output[0], output[1], output[2]
    if not all(isinstance(x, torch.Tensor) for x in (logits, weights, index)):
        return None
    if logits.dim() < 2 or not logits.is_floating_point() or not weights.is_floating_point():
        return None
    if index.is_floating_point() or index.dtype == torch.bool or index.shape != weights.shape:
        return None
    E, k = int(logits.shape[-1]), int(index.shape[-1])
    if E < 2 or not 1 <= k <= E or logits.numel() // E != index.numel() // k:
        return None
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= E):
        return None
    return E, k


def calibration_ids(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """(1, T) token ids of a short real text, or random ids in the vocabulary when it cannot be encoded."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    try:
        ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt")["input_ids"]  # (1, T)
        if ids.numel() and int(ids.max()) < vocab:
            return ids[:, :24]
    except Exception:  # any tokenizer failure: fall back to random ids
        pass
    return torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    routers: list[nn.Module],
    layouts: dict[int, tuple[str, int]] | None = None,
    seams: dict[int, nn.Module] | None = None,
) -> dict[int, Observation]:
    """Record each of ``routers``' outputs on a real forward, then on random inputs of the same scale.

    Keyed by ``id(router)``. ``layouts`` maps known routers to (output layout, k) so that their
    outputs are read as (logits, weights, index); any other module counts when its output is the
    standard layout. ``seams`` maps routers that return logits only to the experts module their
    block calls with the chosen (index, weights) (DBRX). Routers whose choice cannot be read get no entry.
    """
    layouts = layouts or {}
    seen: dict[int, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
    obs: dict[int, Observation] = {}

    def as_std(module: nn.Module, output: Any) -> Any:
        layout, k = layouts.get(id(module), ("std", 0))
        if layout == "std":
            return output
        logits, weights, index = read_router_output(layout, output, k)
        return None if weights is None else (logits, weights, index)

    pending: dict[int, tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]] = {}  # experts id -> router call

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if id(module) in experts_of:  # the choice is read when the block calls its experts
            pending.setdefault(id(experts_of[id(module)]), (args, kwargs, output))
            owners[id(experts_of[id(module)])] = module
            return
        output = as_std(module, output)
        if _looks_like_std_output(output) is None or id(module) in seen:
            return
        seen[id(module)] = (args, kwargs, output)

    def experts_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        router_call = pending.get(id(module))
        owner = owners.get(id(module))
        if router_call is None or owner is None or id(owner) in seen:
            return
        index, weights = experts_choice(args, kwargs)
        seen[id(owner)] = (router_call[0], router_call[1], (router_call[2], weights, index))

    experts_of = seams or {}
    owners: dict[int, nn.Module] = {}
    handles = [r.register_forward_hook(hook, with_kwargs=True) for r in routers]
    handles += [e.register_forward_pre_hook(experts_hook, with_kwargs=True) for e in experts_of.values()]
    try:
        ids = calibration_ids(model, tokenizer)
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(input_ids=ids.to(device), use_cache=False)
            gen = torch.Generator().manual_seed(1)
            for router in routers:
                if id(router) not in seen:
                    continue
                args, kwargs, out = seen[id(router)]
                record = Observation([out[0].detach()], [out[1].detach()], [out[2].detach()])
                record.bias_args = tuple(
                    a for a in [*args[1:], *kwargs.values()] if isinstance(a, torch.Tensor) and a.dim() == 1
                )
                hidden = args[0] if args else next(iter(kwargs.values()))
                if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
                    flat = hidden.reshape(-1, hidden.shape[-1])
                    noise = torch.randn((RANDOM_ROWS, flat.shape[-1]), generator=gen).to(flat.device, flat.dtype)
                    scale = flat.float().std().clamp_min(1e-3).to(flat.dtype)
                    try:
                        rand = (
                            None
                            if id(router) in experts_of
                            else as_std(router, router(noise * scale, *args[1:], **kwargs))
                        )
                    except Exception:  # a router that needs more than a (tokens, hidden) input: real tokens only
                        rand = None
                    if _looks_like_std_output(rand) is not None:
                        record.logits.append(rand[0].detach())
                        record.weights.append(rand[1].detach())
                        record.index.append(rand[2].detach())
                obs[id(router)] = record
    finally:
        for h in handles:
            h.remove()
    return obs


def experts_choice(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weights) from an experts call ``experts(hidden, top_k_index, top_k_weights)``."""
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
    return index, weights


# ----------------------------------------------------------------------------- the grammar
def _attr(objects: list[Any], names: tuple[str, ...]) -> Any:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None and not callable(value):
                return value
    return None


def _bias_candidates(router: nn.Module, parent: nn.Module | None, E: int) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every (E,) tensor named like a bias on the router or its parent block."""
    found: list[tuple[str, torch.Tensor]] = []
    for prefix, owner in (("", router), ("parent.", parent)):
        if owner is None:
            continue
        for name, tensor in [*owner.named_buffers(), *owner.named_parameters()]:
            seen = any(t is tensor for _, t in found)  # the router's own tensors reappear under its parent
            if not seen and "bias" in name.rsplit(".", 1)[-1] and tensor.dim() == 1 and tensor.numel() == E:
                found.append((prefix + name, tensor))
    return found


def candidates(
    router: nn.Module, parent: nn.Module | None, config: Any, E: int, k: int, bias_args: tuple[torch.Tensor, ...]
) -> Iterator[tuple[RouterSpec, torch.Tensor | None]]:
    """Every spec of the grammar worth trying for this router, most common first, with its bias."""
    where = [router, config] if config is not None else [router]
    scale = _attr(where, SCALE_NAMES)
    scales = [float(scale)] if isinstance(scale, (int, float)) and not isinstance(scale, bool) else [None]
    norm_min = _attr([router], ("norm_min",))
    n_group, topk_group = _attr(where, GROUP_NAMES[0]), _attr(where, GROUP_NAMES[1])
    groups: list[tuple[int | None, int | None, str | None]] = [(None, None, None)]
    if isinstance(n_group, int) and isinstance(topk_group, int) and 1 < n_group <= E and E % n_group == 0:
        groups = [(n_group, topk_group, "top2sum"), (n_group, topk_group, "max"), (None, None, None)]
    biases: list[tuple[str | None, torch.Tensor | None]] = [(None, None)]
    biases += [(path, t) for path, t in _bias_candidates(router, parent, E)]
    biases += [(f"arg{i}", t) for i, t in enumerate(bias_args) if t.numel() == E]
    families = [("softmax", True), ("softmax", False), ("topk_softmax", True), ("sigmoid", True), ("sigmoid", False)]
    families += [("sqrtsoftplus", True), ("sqrtsoftplus", False)]
    bias_sides = ("scores", "logits")
    for (family, renorm), (bias_path, bias), (ng, tg, gs), sc, side in itertools.product(
        families, biases, groups, scales, bias_sides
    ):
        if family == "topk_softmax" and (bias is not None or ng is not None):
            continue
        if side == "logits" and (bias is None or ng is not None):
            continue
        spec = RouterSpec(
            family,  # type: ignore[arg-type]
            num_experts=E,
            top_k=k,
            renorm=renorm,
            scale=1.0 if sc is None else sc,
            n_group=ng,
            topk_group=tg,
            group_score=gs,  # type: ignore[arg-type]
            norm_min=float(norm_min) if isinstance(norm_min, (int, float)) and renorm else None,
            bias_path=bias_path,
            bias_on=side,  # type: ignore[arg-type]
        )
        yield spec, bias


# ----------------------------------------------------------------------------- verification
def tolerance(dtype: torch.dtype) -> float:
    """Relative weight tolerance for a router that hands back weights in ``dtype``."""
    return {torch.float32: 2e-5, torch.float64: 1e-9}.get(dtype, 8 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class Check:
    agreement: float  # share of tokens with the same expert set
    max_diff: float  # largest |weight difference| / max(1, |weight|) over matching tokens
    scale: float  # the scale used (solved when the spec had none)


def check(
    spec: RouterSpec,
    bias: torch.Tensor | None,
    logits: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    solve_scale: bool,
) -> Check:
    """Compare ``spec`` run by moe-viz's maths with the router's own (index, weights) on ``logits``."""
    b = None if bias is None else bias.detach().float().cpu()
    mine = select_topk(spec, logits, spec.top_k, b)  # (N, k)
    same = (mine.sort(dim=-1).values == index.sort(dim=-1).values).all(dim=-1)  # (N,)
    agreement = float(same.double().mean()) if len(same) else 0.0
    order_mine, order_native = mine.argsort(dim=-1), index.argsort(dim=-1)
    w_mine = gate_weights(replace(spec, scale=1.0), logits, mine).gather(1, order_mine)  # (N, k) by expert id
    w_native = weights.gather(1, order_native)  # (N, k)
    scale = spec.scale
    if solve_scale and bool(same.any()):
        ratio = w_native[same].sum(dim=-1) / w_mine[same].sum(dim=-1).clamp_min(1e-30)
        scale = float(ratio.median())
    diff = ((w_mine * scale - w_native).abs() / w_native.abs().clamp_min(1.0))[same]
    return Check(agreement, float(diff.max()) if diff.numel() else float("inf"), scale)


def infer(
    router: nn.Module,
    parent: nn.Module | None,
    config: Any,
    observation: Observation,
    known: RouterSpec | None,
) -> tuple[RouterSpec, Verification]:
    """The verified spec of ``router`` (the known class's spec first, then the grammar), or partial
    support with the closest candidate named."""
    logits, weights, index = observation.stacked()
    N, E = logits.shape
    k = int(index.shape[1])
    tol = tolerance(observation.weights[0].dtype)

    def resolve_bias(spec: RouterSpec) -> torch.Tensor | None:
        if spec.bias_path is None:
            return None
        if spec.bias_path.startswith("arg"):
            return observation.bias_args[int(spec.bias_path[3:])]
        owner, path = (
            (parent, spec.bias_path[len("parent.") :])
            if spec.bias_path.startswith("parent.")
            else (router, spec.bias_path)
        )
        obj: Any = owner
        for name in path.split("."):
            obj = getattr(obj, name)
        return obj

    if known is not None and known.family not in ("capture", "native"):
        result = check(known, resolve_bias(known), logits, weights, index, solve_scale=False)
        if result.agreement == 1.0 and result.max_diff <= tol:
            return known, Verification("verified", describe(known), N, result.max_diff, 1.0, source="known class")
    best: tuple[float, float, RouterSpec] | None = None
    for spec, bias in candidates(router, parent, config, E, k, observation.bias_args):
        result = check(spec, bias, logits, weights, index, solve_scale=spec.scale == 1.0)
        adopted = replace(spec, scale=round(result.scale, 6) if abs(result.scale - 1.0) > tol else 1.0)
        if result.agreement == 1.0 and result.max_diff <= tol:
            return adopted, Verification("verified", describe(adopted), N, result.max_diff, 1.0, source="inferred")
        key = (result.agreement, -result.max_diff)
        if best is None or key > best[:2]:
            best = (result.agreement, -result.max_diff, adopted)
    assert best is not None
    agreement, neg_diff, closest = best
    what = (
        f"it picked other experts for {1 - agreement:.0%} of the {N} calibration tokens"
        if agreement < 1.0
        else f"its weights differed by up to {-neg_diff:.2g} (tolerance {tol:.1g})"
    )
    hashed = "hash" in type(router).__name__.lower()
    start = (
        "this router picks experts by token id (hash routing), not from its scores"
        if hashed
        else "no spec of the grammar reproduces this router"
    )
    reason = (
        f"{start}; the closest, {describe(closest)}, {what}. Native routing and capacity at the model's own k run on "
        "the router's own choice and weights; other k and ensemble are refused."
    )
    native = RouterSpec("native", num_experts=E, top_k=k)
    verification = Verification("partial", describe(closest), N, -neg_diff, agreement, reason=reason, source="inferred")
    return native, verification
