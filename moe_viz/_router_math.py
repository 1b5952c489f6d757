"""Router maths: router logits + a ``RouterSpec`` -> scores, expert choices, gate weights, capacity.

Pure functions: tensors in, tensors out; no model, no hooks, no policy. Policies (``policies.py``)
compose them; the router hooks (``_hooks.py``) call the policies.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

from ._routers import RouterSpec


def router_scores(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """Per-expert router scores (T, E) in float32: softmax, sigmoid, or sqrt(softplus) per the router's family."""
    logits = logits.float()  # (T, E)
    if spec.family == "sigmoid":
        return logits.sigmoid()
    if spec.family == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return logits.softmax(dim=-1)


def trace_scores(spec: RouterSpec, logits: torch.Tensor) -> torch.Tensor:
    """The per-expert scores (T, E) float32 a trace shows: the router family's own score function
    where moe-viz re-implements the router, a plain softmax for capture-only routers."""
    return router_scores(spec, logits) if spec.substitutable else logits.float().softmax(dim=-1)


def _group_mask(spec: RouterSpec, choice: torch.Tensor) -> torch.Tensor:
    """(T, E) bool: experts inside each token's best ``topk_group`` groups."""
    assert spec.n_group is not None and spec.topk_group is not None
    T, E = choice.shape
    grouped = choice.view(T, spec.n_group, E // spec.n_group)  # (T, G, E/G)
    if spec.group_score == "top2sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
    else:
        group_scores = grouped.max(dim=-1).values  # (T, G)
    best = group_scores.topk(spec.topk_group, dim=-1).indices  # (T, topk_group)
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (T, G)
    return mask.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E)


def select_topk(
    spec: RouterSpec,
    logits: torch.Tensor,
    k: int,
    selection_bias: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, k) expert ids, best first, chosen exactly as the architecture chooses them.

    The group limit applies while ``k`` fits inside it; a larger k ignores groups (the native
    code would otherwise have to pick masked experts arbitrarily). ``scores``: the
    ``router_scores`` of ``logits``, where the caller has them already.
    """
    if not _chooses_by_scores(spec):
        choice = logits.float()  # (T, E)
    else:
        choice = scores if scores is not None else router_scores(spec, logits)  # (T, E), never written to
    if selection_bias is not None and spec.bias_on == "logits":
        choice = logits.float() + selection_bias.float()  # (T, E) a bias on the logits (monotone scores after)
    elif selection_bias is not None:
        choice = choice + selection_bias.float()
    limit = spec.group_limit
    if limit is not None and k <= limit:
        fill = float("-inf") if spec.group_score == "top2sum" else 0.0
        choice = choice.masked_fill(~_group_mask(spec, choice), fill)
    return choice.topk(k, dim=-1).indices  # (T, k), sorted best first


def sparsemixer_weights(logits: torch.Tensor, index: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """(T, k') sparsemixer weights (PhiMoE, eval mode) of the experts in ``index``, slot by slot in
    order of their logits: each weight is the softmax of its logit over the experts not taken by an
    earlier slot whose logits lie within a relative 2 * jitter_eps of it."""
    scores = logits.float()  # (T, E)
    order = scores.gather(1, index).argsort(dim=-1, descending=True)  # (T, k') slot order
    ranked = index.gather(1, order)  # (T, k') experts, highest logit first
    remaining = scores.clone()  # (T, E) -inf where an earlier slot took the expert
    out = torch.empty(ranked.shape, dtype=torch.float32)  # (T, k')
    for slot in range(ranked.shape[1]):
        e = ranked[:, slot : slot + 1]  # (T, 1)
        top = remaining.gather(1, e)  # (T, 1) this slot's logit (the max of what remains)
        factor = scores.abs().clamp(min=top)  # (T, E) as the architecture computes it
        far = (top - scores) / factor > 2 * jitter_eps  # (T, E) too far below to share the slot
        gates = remaining.masked_fill(far, float("-inf")).softmax(dim=-1)  # (T, E)
        out[:, slot] = gates.gather(1, e).squeeze(1)
        remaining = remaining.scatter(1, e, float("-inf"))
    return torch.empty_like(out).scatter_(1, order, out)  # back to ``index``'s order


def gate_weights(
    spec: RouterSpec, logits: torch.Tensor, index: torch.Tensor, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, k') float32 weights the architecture gives to the experts in ``index`` (``scores``: the
    ``router_scores`` of ``logits``, where the caller has them already)."""
    if spec.family == "sparsemixer":
        return sparsemixer_weights(logits, index, spec.jitter_eps or 0.0) * spec.scale
    if spec.family == "topk_softmax":
        return logits.float().gather(1, index).softmax(dim=-1)  # (T, k')
    scores = scores if scores is not None else router_scores(spec, logits)  # (T, E)
    weights = scores.gather(1, index)  # (T, k')
    if spec.renorm:
        total = weights.sum(dim=-1, keepdim=True)
        if spec.norm_min is not None:
            total = total.clamp(min=spec.norm_min)
        elif spec.family in ("sigmoid", "sqrtsoftplus"):
            total = total + 1e-20
        weights = weights / total
    return weights * spec.scale


@functools.lru_cache(maxsize=4096)  # every router of every forward asks, mostly the same few questions
def capacity_for(factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """C = ceil(factor * T * k / E), computed exactly (no float rounding at integer boundaries)."""
    exact = Fraction(factor).limit_denominator(10**9) * num_tokens * k / num_experts
    return max(0, math.ceil(exact))


def apply_capacity(index: torch.Tensor, gates: torch.Tensor, capacity: int, priority: str) -> torch.Tensor:
    """(T, k) bool mask of assignments dropped because their expert is over ``capacity``.

    ``position`` ranks assignments slot-major (all first choices in token order, then all second
    choices, ...); ``probs`` ranks them by gate weight, highest first (ties: slot-major order).
    """
    T, k = index.shape
    order_ids = index.t().reshape(-1)  # (k*T,) slot-major
    if priority == "probs":
        order = torch.sort(gates.t().reshape(-1), descending=True, stable=True).indices  # (k*T,)
    else:
        order = torch.arange(k * T, device=index.device)
    experts = order_ids[order]  # (k*T,) in priority order
    num_experts = int(index.max().item()) + 1 if index.numel() else 1
    onehot = torch.nn.functional.one_hot(experts, num_experts)  # (k*T, E)
    rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (k*T,) 0-based place in its expert's queue
    dropped_sorted = rank >= capacity
    dropped = torch.empty_like(dropped_sorted)
    dropped[order] = dropped_sorted
    return dropped.view(k, T).t().contiguous()  # (T, k)


def _chooses_by_scores(spec: RouterSpec) -> bool:
    """Whether the router picks its experts by its scores (not by the raw logits)."""
    return spec.family not in ("topk_softmax", "sparsemixer")


def route_top_k(
    spec: RouterSpec, logits: torch.Tensor, k: int, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weights), each (T, k): ``select_topk`` and ``gate_weights``, the router's scores
    computed once for both (a softmax over few experts costs about as much as the rest together)."""
    scores = router_scores(spec, logits) if _chooses_by_scores(spec) else None  # (T, E)
    index = select_topk(spec, logits, k, selection_bias, scores)  # (T, k)
    return index, gate_weights(spec, logits, index, scores)  # (T, k)
