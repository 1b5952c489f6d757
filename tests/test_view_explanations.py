"""Each view's explanation cites the right numbers for hand-built traces."""

from __future__ import annotations

import math

import pytest
import torch
from hand_traces import SKEWED, make_layer, make_trace

from moe_viz import views


def test_view_load_cites_share_fair_share_and_counterfactual_drops() -> None:
    text = views.expert_load(make_trace([make_layer(SKEWED, 4)]), 0).explanation
    assert "most assignments in layer 0 to expert 0: 4 of 8 (50%)" in text
    assert "2× its fair share of 2 (= 8 assignments / 4 experts)" in text
    assert "At capacity factor 1.0 (C = 2 per expert), counted on the model's own top-2 routing" in text
    assert "expert 0 would drop 2 of 4" in text


def test_view_load_under_capacity_cites_actual_drops() -> None:
    lt = make_layer(SKEWED, 4, dropped=[[False, False], [False, False], [False, True], [False, True]], capacity=[2])
    text = views.expert_load(make_trace([lt], policy="capacity:1:position"), 0).explanation
    assert "With capacity C = 2 per expert it processed 2 and dropped 2" in text
    assert "the layer dropped 2 of 8 (25%)" in text


def test_view_load_counts_dead_experts() -> None:
    text = views.expert_load(make_trace([make_layer([[0, 1], [0, 1]], 4)]), 0).explanation
    assert "2 of 4 experts processed no token" in text


def test_view_heatmap_cites_confident_token_and_fragile_margins() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03], [0.4, 0.3, 0.28, 0.02]])
    lt = make_layer([[0, 1], [0, 1]], 4, probs=probs)
    text = views.routing_heatmap(make_trace([lt], tokens=["a", "b"]), 0).explanation
    assert "`a` (position 0), giving 0.60 to expert 0" in text
    assert "1 of 2 tokens have a top-2 margin" in text  # 0.3 - 0.28


def test_view_token_text_cites_first_choice_reuse() -> None:
    text = views.coloured_text(make_trace([make_layer(SKEWED, 4)]), 0).explanation
    assert "Expert 0 is the most common first choice (2 of 4 tokens)" in text  # first choices 0, 0, 1, 3
    assert "same first choice 33.3% of the time; random routing would give 25%" in text


def test_view_router_distribution_cites_chosen_experts_and_margin() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    lt = make_layer([[1, 3]], 4, probs=probs, dropped=[[False, True]])
    text = views.router_distribution(make_trace([lt], tokens=["x`y"]), 0, 0).explanation
    assert "`xˋy`" in text
    assert "expert 1 (0.50), expert 3 (0.30), carrying 80%" in text
    assert "highest-scoring expert it was not sent to is 2 (0.15)." in text
    assert "dropped 1 of its 2 assignments (expert 3)" in text


def test_view_router_distribution_rejects_bad_position() -> None:
    with pytest.raises(ValueError, match=r"position must be an integer with -4 <= position < 4; got 4"):
        views.router_distribution(make_trace([make_layer(SKEWED, 4)]), 0, 4)


def test_view_predictions_cites_top_token_and_actual_next_token() -> None:
    lt = make_layer([[0, 1], [1, 2]], 4)
    trace = make_trace(
        [lt],
        vocab_probs=[[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]],
        tokens=["the", " cat"],
        target=[math.log(0.2), float("nan")],
    )
    text = views.predictions(trace, 0).explanation
    assert "After `the` (position 0) the model predicts `w0` with 70%, then `w1` 20%, `w2` 10%" in text
    assert "The actual next token `␣cat` got 20%" in text
    assert "actual" not in views.predictions(trace, -1).explanation


def test_view_coactivation_cites_pair_and_baseline() -> None:
    text = views.coactivation(make_trace([make_layer([[0, 1], [0, 2], [1, 0], [2, 3]], 4)]), 0).explanation
    assert "when expert 0 is chosen, expert 1 is chosen too 66.7% of the time (2 of 3 tokens)" in text
    assert "2× the 33.3% expected" in text and "fewer than 3 tokens are not cited" in text


def test_view_reuse_cites_rates_and_baselines() -> None:
    text = views.reuse(make_trace([make_layer([[0, 1], [0, 2], [1, 0], [2, 3]], 4)]), 0).explanation
    assert "same first-choice expert 33.3% of the time (random: 25%)" in text
    assert "66.7% of the time (random: 83.3%)" in text
    assert "0.67 experts on average (random: 1.00), over 3 pairs" in text


def test_view_balance_table_cites_cv_range_and_aux_loss() -> None:
    balanced = make_layer([[0, 1], [2, 3]], 4, layer=0)
    skewed = make_layer(SKEWED, 4, layer=1)
    text = views.balance_table(make_trace([balanced, skewed])).explanation
    assert "from 0.00 (layer 0) to 0.61 (layer 1)" in text
    assert "processes 2× the mean load (MaxVio 1.00)" in text
    assert "(2 under perfectly even routing; lower values are possible)" in text


def test_view_capacity_of_a_capacity_run_cites_drops() -> None:
    lt = make_layer(SKEWED, 4, dropped=[[False, False], [False, False], [True, True], [False, True]], capacity=[2])
    text = views.layer_load(make_trace([lt], policy="capacity:1:position")).explanation
    assert "(C = 2; k = 2, E = 4)" in text
    assert "3 of 8 assignments were dropped over all layers (37.5%)" in text
    assert "1 token-layer lost every routed expert (only the residual path carries them)" in text
    assert "1 lost some" in text


def test_view_capacity_of_a_dropless_run_is_counterfactual() -> None:
    text = views.layer_load(make_trace([make_layer(SKEWED, 4)])).explanation
    assert "dropless" in text and "would overflow most in layer 0: 2 of 8 assignments (25%)" in text


def test_view_mode_effect_cites_flips_kl_and_delta() -> None:
    lt = make_layer([[0, 1], [1, 2]], 4)
    ref = make_trace([lt], vocab_probs=[[0.5, 0.5], [0.6, 0.4]], target=[math.log(0.5), float("nan")])
    oth = make_trace([lt], vocab_probs=[[0.9, 0.1], [0.2, 0.8]], target=[math.log(0.1), float("nan")], policy="top-k:1")
    text = views.mode_effect(ref, oth).explanation
    kl1 = 0.6 * math.log(3) + 0.4 * math.log(0.5)
    kl0 = 0.5 * math.log(25 / 9)
    assert "at 1 of 2 positions (50%)" in text
    assert f"mean KL divergence is {(kl0 + kl1) / 2:.3f} nats" in text
    assert f"largest after `t0` (position 0, {kl0:.3f})" in text
    assert f"changes by {math.log(0.2):+.3g}" in text and "less likely" in text


def test_every_explanation_handles_an_ensemble_trace() -> None:
    lt = make_layer([[0, 1, 2, 3]] * 3, 4, probs=torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    trace = make_trace([lt], policy="ensemble:gate")
    texts = [
        views.expert_load(trace, 0).explanation,
        views.routing_heatmap(trace, 0).explanation,
        views.coloured_text(trace, 0).explanation,
        views.router_distribution(trace, 0, 1).explanation,
        views.predictions(trace).explanation,
        views.coactivation(trace, 0).explanation,
        views.reuse(trace, 0).explanation,
        views.balance_table(trace).explanation,
        views.layer_load(trace).explanation,
        views.mode_effect(trace, trace).explanation,
    ]
    assert all(isinstance(t, str) and t for t in texts)
    assert "Every expert processes every one of the 3 tokens" in texts[0]


def test_run_summary_names_policy_drops_and_a_fingerprint_that_changes_with_routing():
    from tiny_models import build

    from moe_viz import Capacity, TopK, run_prompt
    from moe_viz.views import run_summary

    model = build("mixtral")
    capacity = run_prompt(model, "hello routing", Capacity(0.5))
    native = run_prompt(model, "hello routing", TopK(2))
    line = run_summary(capacity)
    assert line.startswith("Run summary: `capacity:0.5:position` · 13 tokens · dropped per layer ")
    assert ", ".join(str(lt.dropped_count) for lt in capacity.layers) in line
    assert capacity.fingerprint() in line and capacity.fingerprint() != native.fingerprint()
    assert run_prompt(model, "hello routing", Capacity(0.5)).fingerprint() == capacity.fingerprint()


def test_heatmap_explanation_of_a_long_prompt_speaks_of_token_groups_not_dots(monkeypatch):
    from tiny_models import build

    from moe_viz import run_prompt
    from moe_viz.views import _display, routing, token_bins

    monkeypatch.setattr(_display, "BIN_THRESHOLD", 64)  # the tiny model has only 512 positions
    monkeypatch.setattr(_display, "MAX_BINS", 50)
    model = build("mixtral")
    long = run_prompt(model, "ab" * 100, None)
    assert token_bins(long.num_tokens) > 1
    text = routing.routing_heatmap(long, 0).explanation
    assert f"group of {token_bins(long.num_tokens)} consecutive tokens" in text and "dots" not in text
    assert "dots mark" in routing.routing_heatmap(run_prompt(model, "short", None), 0).explanation
