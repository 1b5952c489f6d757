"""Causal importance of each expert on one prompt: how much the next-token loss rises when that
expert is ablated, beside how much load it carries, and how well the one predicts the other.

One batched forward per MoE layer: the prompt is repeated E times and row e of the batch runs
with expert e ablated in that layer (``_AblateOnePerRow``, a policy that reads which sequence
each token row belongs to). Load alone misleads: a busy expert can matter little, a rarely used
one a lot. This is one prompt; corpus-scale importance belongs to corpus runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch

from ._hooks import active_call
from ._runs import Prompt, encode, run_prompt
from .interventions import ABLATION_MODES
from .models import MoEModel
from .policies import Policy, RouterCall, RoutingDecision, top_k_routing


@dataclass(frozen=True)
class _AblateOnePerRow(Policy):
    """In ``layer``, sequence e of the batch runs with expert e ablated ("reroute" or "zero")."""

    layer: int
    mode: str = "reroute"

    @property
    def spec(self) -> str:
        return f"ablate-one-per-row:{self.layer}:{self.mode}"

    def decide(self, call: RouterCall) -> RoutingDecision | None:
        if call.layer != self.layer or call.groups is None:
            return None
        E = call.router.num_experts
        expert = call.groups.clamp_min(0) % E  # (N,) the expert this row's sequence ablates
        if self.mode == "zero":
            index, weights = top_k_routing(call, call.router.top_k)  # (N, k)
            weights = weights.masked_fill(index == expert.unsqueeze(1), 0.0)
            return RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))
        masked = call.logits.float().scatter(1, expert.unsqueeze(1), float("-inf"))  # (N, E)
        index, weights = top_k_routing(replace(call, logits=masked), call.router.top_k)
        return RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))


@dataclass(frozen=True)
class Importance:
    """Per (layer, expert): ``delta_loss`` (mean next-token loss with the expert ablated minus
    without, nats; negative when the prompt does better without it), ``importance`` (its absolute
    value) and ``load_share`` (the expert's share of the layer's native assignments); and per layer
    the Spearman rank correlation between importance and load share (NaN when either is constant)."""

    table: pd.DataFrame  # columns: layer, expert, delta_loss, importance, load_share
    rank_correlation: dict[int, float]
    base_loss: float
    mode: str


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        s = pd.Series(x.double().numpy())
        return torch.tensor(s.rank(method="average").to_numpy())

    ra, rb = ranks(a), ranks(b)
    if float(ra.std()) == 0 or float(rb.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def expert_importance(
    model: MoEModel, prompt: Prompt, mode: str = "reroute", max_tokens: int | None = None
) -> Importance:
    """Loss change when each expert of each MoE layer is ablated, against its load share."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}; got {mode!r}")
    native = run_prompt(model, prompt, None, max_tokens=max_tokens)
    if native.num_tokens < 2:
        raise ValueError("prompt must have at least 2 tokens: the loss is over the actual next tokens")
    base_loss = native.next_token_loss()
    ids = encode(model, prompt, max_tokens)  # (1, T)
    targets = ids[0, 1:]  # (T-1,)
    rows, correlations = [], {}
    for site in model.sites:
        if not site.spec.substitutable:
            continue
        E = site.spec.num_experts
        batch = ids.expand(E, -1)  # (E, T): row e ablates expert e
        policy = _AblateOnePerRow(site.layer, mode)
        with torch.inference_mode(), active_call(policy):
            logits = model.model(input_ids=batch, use_cache=False).logits  # (E, T, V)
        logp = logits[:, :-1].float().log_softmax(-1)  # (E, T-1, V)
        loss = -logp.gather(2, targets.expand(E, -1).unsqueeze(-1)).squeeze(-1).mean(dim=1)  # (E,)
        delta = loss.cpu() - base_loss  # (E,)
        load = torch.bincount(native.layer(site.layer).native_index.reshape(-1), minlength=E).double()
        share = load / load.sum()
        rows += [
            {
                "layer": site.layer,
                "expert": e,
                "delta_loss": float(delta[e]),
                "importance": abs(float(delta[e])),
                "load_share": float(share[e]),
            }
            for e in range(E)
        ]
        correlations[site.layer] = _spearman(delta.abs(), share)
    if not rows:
        raise ValueError("this model has no router whose maths moe-viz reproduces: ablation cannot run on it")
    table = pd.DataFrame(rows, columns=["layer", "expert", "delta_loss", "importance", "load_share"])
    return Importance(table, correlations, base_loss if math.isfinite(base_loss) else float("nan"), mode)
