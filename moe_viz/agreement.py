"""Agreement between two traces of the same tokens: two policies, two checkpoints of one
architecture (OLMoE's "router saturation": how much of the final routing an earlier checkpoint
already has), or a trace imported from a serving engine against one recomputed here.

Per MoE layer: the mean top-k overlap ``|S_a ∩ S_b| / k`` (S = the experts that processed the
token, k = the larger of the two runs' applied k, so two identical routings score 1) and the
top-1 match rate (the same first-choice expert; NaN where an import lists experts by id, so
has no first choice). Per token at one layer: both expert sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from . import metrics
from .trace import Trace


@dataclass(frozen=True)
class Agreement:
    """``per_layer``: layer, topk_overlap, top1_match, k; ``overlap`` (L, T) and ``top1`` (L, T)
    per token, rows in ``layers`` order."""

    a_name: str
    b_name: str
    layers: list[int]
    per_layer: pd.DataFrame
    overlap: torch.Tensor  # (L, T) float: |S_a ∩ S_b| / k per token
    top1: torch.Tensor  # (L, T) bool: same first-choice expert

    def tokens(self, a: Trace, b: Trace, layer: int) -> pd.DataFrame:
        """One row per token at ``layer``: position, token, experts_a, experts_b, overlap, top1_match."""
        i = self.layers.index(a.layer(layer).layer)
        sa, sb = metrics.membership(a.layer(layer), "kept"), metrics.membership(b.layer(layer), "kept")  # (T, E)
        return pd.DataFrame(
            {
                "position": range(a.num_tokens),
                "token": a.tokens,
                "experts_a": [" ".join(f"e{e}" for e in row.nonzero().flatten().tolist()) for row in sa],
                "experts_b": [" ".join(f"e{e}" for e in row.nonzero().flatten().tolist()) for row in sb],
                "overlap": self.overlap[i].tolist(),
                "top1_match": self.top1[i].tolist(),
            }
        )


def agreement(a: Trace, b: Trace, a_name: str | None = None, b_name: str | None = None) -> Agreement:
    """How far two routings of the same tokens agree, layer by layer. ``a_name`` / ``b_name`` name
    the two in the views (default: the policies of one model, else the two model ids).

    ValueError unless both are traces of the same token ids with the same MoE layers and experts."""
    for name, tr in (("a", a), ("b", b)):
        if not isinstance(tr, Trace):
            raise ValueError(f"{name} must be a Trace; got {type(tr).__name__}")
    if list(a.token_ids) != list(b.token_ids):
        raise ValueError(
            f"b must route the same token ids as a (got {b.num_tokens} tokens vs {a.num_tokens}, or different ids)"
        )
    if a.layer_ids != b.layer_ids:
        raise ValueError(f"b must have the same MoE layers as a; got {b.layer_ids} vs {a.layer_ids}")
    rows, overlaps, top1s = [], [], []
    for la, lb in zip(a.layers, b.layers, strict=True):
        if la.num_experts != lb.num_experts:
            raise ValueError(
                f"layer {la.layer}: b has {lb.num_experts} experts, a has {la.num_experts}; "
                "agreement needs one architecture"
            )
        sa, sb = metrics.membership(la, "kept"), metrics.membership(lb, "kept")  # (T, E)
        k = max(la.applied_k, lb.applied_k)
        overlap = (sa & sb).sum(dim=-1).float() / k  # (T,)
        known = la.first_choice_known and lb.first_choice_known  # an import listing ids by id has no first choice
        if known:
            same_first = metrics.first_choice(la, "kept") == metrics.first_choice(lb, "kept")  # (T,)
            top1 = same_first & (sa.any(dim=-1) == sb.any(dim=-1))  # a token with every assignment dropped has none
        else:
            top1 = torch.zeros(la.num_tokens, dtype=torch.bool)
        overlaps.append(overlap)
        top1s.append(top1)
        rows.append(
            {
                "layer": la.layer,
                "topk_overlap": float(overlap.mean()) if len(overlap) else float("nan"),
                "top1_match": float(top1.double().mean()) if len(top1) and known else float("nan"),
                "k": k,
            }
        )
    return Agreement(
        a_name=a_name or (a.policy if a.model_id == b.model_id else a.model_id),
        b_name=b_name or (b.policy if a.model_id == b.model_id else b.model_id),
        layers=a.layer_ids,
        per_layer=pd.DataFrame(rows, columns=["layer", "topk_overlap", "top1_match", "k"]),
        overlap=torch.stack(overlaps),
        top1=torch.stack(top1s),
    )
