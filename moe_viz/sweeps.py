"""Sweeps on one prompt: what the capacity factor and k do, as curves.

Both run as one batched forward: the prompt is repeated once per setting and a per-row policy
gives each sequence of the batch its own setting (it reads which sequence each token row belongs
to), so a sweep costs one forward of a bigger batch, not one forward per point. Settings known to
equal the native run (k = the model's own k; a factor whose capacity covers the busiest expert of
every layer) are not rerun, and the effects (KL, flips, loss) come straight from the batched
logits, vectorised, without building a trace per point.

* ``capacity_sweep``: per factor, the drop rate of every layer, and the KL to native, top-1 flips
  and next-token loss — the classic picture of why a capacity factor above 1 exists.
* ``k_sweep``: per k (1..E), the share of expert compute (k / E), KL to native, flips and loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ._hooks import Forward, active_call
from ._router_math import capacity_for
from ._runs import Prompt, encode
from .models import MoEModel
from .policies import Policy, RouterCall, RoutingDecision, capacity_decision, top_k_routing

DEFAULT_FACTORS = tuple(round(0.25 * 2 ** (i / 2), 4) for i in range(9))  # 0.25 .. 4, log-spaced


@dataclass(frozen=True)
class _CapacityPerRow(Policy):
    """Sequence i of the batch runs ``Capacity(factors[i])`` at the model's own k."""

    factors: tuple[float, ...]
    priority: str = "position"

    recompute_when_generating = True

    @property
    def spec(self) -> str:
        return "capacity-sweep:" + ",".join(f"{f:g}" for f in self.factors)

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        index, weights = top_k_routing(call, call.router.top_k)  # (N, k)
        return capacity_decision(call, index, weights, list(self.factors), self.priority)


@dataclass(frozen=True)
class _TopKPerRow(Policy):
    """Sequence i of the batch runs ``TopK(ks[i])``; narrower rows are padded with weight-0 slots."""

    ks: tuple[int, ...]

    @property
    def spec(self) -> str:
        return "top-k-sweep:" + ",".join(map(str, self.ks))

    def experts_per_token(self, router) -> int:  # noqa: ANN001 - RouterSpec
        return max(self.ks)

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        width = max(self.ks)
        index, weights = top_k_routing(call, width)  # (N, width), best first
        out_w = torch.zeros_like(weights)
        for i, rows in enumerate(call.sequences()):
            k = self.ks[i % len(self.ks)]
            _, own = top_k_routing(call, k)  # the architecture's weights over exactly k experts
            out_w[rows, :k] = own[rows]
        return RoutingDecision(index, out_w, torch.zeros_like(index, dtype=torch.bool))


def _forward_rows(model: MoEModel, ids: torch.Tensor, policy: Policy | None, rows: int) -> tuple[torch.Tensor, Forward]:
    """Logits (rows, T, V) of ``rows`` copies of ``ids`` (1, T) run as one batch under ``policy``,
    and the recorded router calls of that forward."""
    with torch.inference_mode(), active_call(policy) as recorder:
        logits = model.model(input_ids=ids.expand(rows, -1), use_cache=False).logits  # (rows, T, V)
    return logits, recorder.forwards[0]


def _effects(native: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> list[dict[str, float]]:
    """Per row of ``logits`` (R, T, V) against ``native`` (T, V): mean KL(native || row), top-1
    flip rate and mean next-token loss, vectorised in float32 (the definitions of
    ``metrics.mode_effect`` and ``Trace.next_token_loss``)."""
    if logits.shape[0] == 0:
        return []
    lp = native.float().log_softmax(-1)  # (T, V)
    p = lp.exp()
    lq = logits.float().log_softmax(-1)  # (R, T, V)
    kl = ((p * lp).sum(-1) - torch.einsum("tv,rtv->rt", p, lq)).clamp_min(0)  # (R, T)
    flips = lq.argmax(-1) != lp.argmax(-1)  # (R, T)
    R = lq.shape[0]
    nll = -lq[:, :-1].gather(2, targets.expand(R, -1).unsqueeze(-1)).squeeze(-1)  # (R, T-1)
    loss = nll.mean(dim=1) if nll.shape[1] else torch.full((R,), float("nan"))  # (R,)
    return [
        {"mean_kl": float(kl[r].mean()), "flip_rate": float(flips[r].double().mean()), "loss": float(loss[r])}
        for r in range(R)
    ]


def _native(model: MoEModel, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor, Forward]:
    ids = encode(model, prompt)  # (1, T)
    logits, forward = _forward_rows(model, ids, None, 1)
    return ids, logits[0], forward


def _native_loss(native: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The effects of the native run against itself: no KL, no flip, the native loss."""
    return {**_effects(native, native.unsqueeze(0), targets)[0], "mean_kl": 0.0, "flip_rate": 0.0}


def _drop_free(model: MoEModel, forward: Forward, factor: float, T: int) -> bool:
    """True when capacity ``factor`` drops nothing: C covers the busiest expert of the native run in
    every MoE layer, so every layer sees its native input and the run equals native routing."""
    specs = {site.layer: site.spec for site in model.sites}
    for call in forward.layers:
        spec = specs[call.layer]
        if call.native_index is None or not spec.substitutable:
            return False
        busiest = int(torch.bincount(call.native_index.reshape(-1), minlength=spec.num_experts).max())
        if capacity_for(factor, T, spec.top_k, spec.num_experts) < busiest:
            return False
    return True


def capacity_sweep(
    model: MoEModel, prompt: Prompt, factors: tuple[float, ...] = DEFAULT_FACTORS, priority: str = "position"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-factor effects: factor, mean_kl, flip_rate, loss; per factor and layer: factor, layer,
    capacity, drop_rate), from one batched forward of the factors that drop something (a factor
    whose C covers the busiest expert of every layer is the native run, so it is not rerun)."""
    if not factors or any(not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"factors must be finite numbers > 0; got {factors!r}")
    model.instrumentation.check(_CapacityPerRow(tuple(factors), priority))
    ids, native, native_forward = _native(model, prompt)
    T = ids.shape[1]
    targets = ids[0, 1:]  # (T-1,)
    free = [_drop_free(model, native_forward, f, T) for f in factors]
    run = tuple(f for f, skip in zip(factors, free, strict=True) if not skip)
    logits, forward = _forward_rows(model, ids, _CapacityPerRow(run), len(run)) if run else (native[:0], None)
    ran = iter(_effects(native, logits, targets))
    same = _native_loss(native, targets)
    effects = pd.DataFrame([{"factor": f, **(same if skip else next(ran))} for f, skip in zip(factors, free)])
    rows, i = [], 0
    specs = {site.layer: site.spec for site in model.sites}
    for f, skip in zip(factors, free, strict=True):
        calls = native_forward.layers if skip else forward.layers
        for call in calls:
            spec = specs[call.layer]
            capacity = capacity_for(f, T, spec.top_k, spec.num_experts) if spec.substitutable else None
            if skip or call.dropped is None:
                rate = 0.0
            else:
                dropped = call.dropped.reshape(len(run), T, -1)[i]  # (T, k) this factor's row
                rate = float(dropped.double().mean()) if dropped.numel() else 0.0
            rows.append({"factor": f, "layer": call.layer, "capacity": capacity, "drop_rate": rate})
        i += not skip
    return effects, pd.DataFrame(rows, columns=["factor", "layer", "capacity", "drop_rate"])


def k_sweep(model: MoEModel, prompt: Prompt, ks: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Per k: k, compute_share (k / E), mean_kl, flip_rate, loss — from one batched forward (the
    model's own k is the native run and is not rerun)."""
    E = model.num_experts
    ks = tuple(range(1, E + 1)) if ks is None else tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E for k in ks):
        raise ValueError(f"ks must be integers with 1 <= k <= {E}; got {ks!r}")
    model.instrumentation.check(_TopKPerRow(ks))
    ids, native, _ = _native(model, prompt)
    targets = ids[0, 1:]  # (T-1,)
    run = tuple(k for k in ks if k != model.top_k)
    logits = _forward_rows(model, ids, _TopKPerRow(run), len(run))[0] if run else native[:0]
    ran = iter(_effects(native, logits, targets))
    same = _native_loss(native, targets)
    rows = [{"k": k, "compute_share": k / E, **(same if k == model.top_k else next(ran))} for k in ks]
    return pd.DataFrame(rows)
