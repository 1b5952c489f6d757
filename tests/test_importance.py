"""Causal importance per expert on one prompt: the loss change when an expert is ablated."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build

from moe_viz import Ablate, run_prompt
from moe_viz.importance import expert_importance

TEXT = "abcabcabc the loss moves when an expert that matters is switched off"


def test_batched_importance_equals_one_ablated_run_per_expert():
    model = build("mixtral")
    result = expert_importance(model, TEXT)
    layer = model.sites[1].layer
    for expert in (0, 5):
        trace = run_prompt(model, TEXT, Ablate(layer, (expert,)))
        loss = -float(trace.output.target_logprob[:-1].mean())
        row = result.table[(result.table.layer == layer) & (result.table.expert == expert)]
        assert float(row.delta_loss.iloc[0]) == pytest.approx(loss - result.base_loss, abs=1e-4)
    assert len(result.table) == model.num_experts * len(model.sites)
    assert result.table.groupby("layer").load_share.sum().round(6).eq(1.0).all()


def test_an_expert_whose_output_is_scaled_up_ranks_first():
    model = build("mixtral")
    layer = model.sites[0].layer
    experts = model.model.get_submodule(model.sites[0].path.rsplit(".", 1)[0]).experts
    with torch.no_grad():  # expert 6 now dominates every token it processes, and the logits are sharp
        experts.down_proj[6] *= 1000.0
        model.model.lm_head.weight *= 100.0
    result = expert_importance(model, TEXT)
    first = result.table[result.table.layer == layer].sort_values("importance", ascending=False).iloc[0]
    assert int(first.expert) == 6 and first.importance > 0 and first.importance == abs(first.delta_loss)
    assert set(result.rank_correlation) == {site.layer for site in model.sites}
    assert all(math.isnan(r) or -1.0 <= r <= 1.0 for r in result.rank_correlation.values())


def test_zero_mode_and_bad_input_are_handled():
    model = build("mixtral")
    zero = expert_importance(model, TEXT, mode="zero")
    assert zero.mode == "zero" and len(zero.table) == 16
    with pytest.raises(ValueError, match="mode must be one of"):
        expert_importance(model, TEXT, mode="cut")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        expert_importance(model, "a")
