"""Sweeps on one prompt: what the capacity factor and k do, as curves.

Both run as one batched forward: the prompt is repeated once per setting and a per-row policy
gives each sequence of the batch its own setting (it reads which sequence each token row belongs
to), so a sweep costs about one forward of a bigger batch, not one forward per point.

* ``capacity_sweep``: per factor, the drop rate of every layer, and the KL to native, top-1 flips
  and next-token loss — the classic picture of why a capacity factor above 1 exists.
* ``k_sweep``: per k (1..E), the share of expert compute (k / E), KL to native, flips and loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from . import metrics
from ._runs import Prompt, run_batch, run_prompt
from .models import MoEModel
from .policies import Policy, RouterCall, RoutingDecision, capacity_decision, top_k_routing
from .trace import Trace

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


def _effects(native: Trace, traces: list[Trace]) -> list[dict[str, float]]:
    out = []
    for trace in traces:
        effect = metrics.mode_effect(native, trace)
        out.append({"mean_kl": effect.mean_kl, "flip_rate": effect.flip_rate, "loss": trace.next_token_loss()})
    return out


def capacity_sweep(
    model: MoEModel, prompt: Prompt, factors: tuple[float, ...] = DEFAULT_FACTORS, priority: str = "position"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-factor effects: factor, mean_kl, flip_rate, loss; per factor and layer: factor, layer,
    capacity, drop_rate), from one batched forward."""
    if not factors or any(not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0) for f in factors):
        raise ValueError(f"factors must be finite numbers > 0; got {factors!r}")
    model.instrumentation.check(_CapacityPerRow(tuple(factors), priority))
    native = run_prompt(model, prompt)
    traces = run_batch(model, [prompt] * len(factors), _CapacityPerRow(tuple(factors), priority))
    effects = pd.DataFrame([{"factor": f, **e} for f, e in zip(factors, _effects(native, traces), strict=True)])
    drops = pd.DataFrame(
        [
            {
                "factor": f,
                "layer": lt.layer,
                "capacity": (lt.capacity or [None])[0],
                "drop_rate": lt.dropped_count / lt.dropped.numel() if lt.dropped.numel() else 0.0,
            }
            for f, trace in zip(factors, traces, strict=True)
            for lt in trace.layers
        ]
    )
    return effects, drops


def k_sweep(model: MoEModel, prompt: Prompt, ks: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Per k: k, compute_share (k / E), mean_kl, flip_rate, loss — from one batched forward."""
    E = model.num_experts
    ks = tuple(range(1, E + 1)) if ks is None else tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E for k in ks):
        raise ValueError(f"ks must be integers with 1 <= k <= {E}; got {ks!r}")
    model.instrumentation.check(_TopKPerRow(ks))
    native = run_prompt(model, prompt)
    traces = run_batch(model, [prompt] * len(ks), _TopKPerRow(ks))
    rows = [{"k": k, "compute_share": k / E, **e} for k, e in zip(ks, _effects(native, traces), strict=True)]
    return pd.DataFrame(rows)
