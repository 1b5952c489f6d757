"""The views of interventions, sweeps, paths, fragility, prefill vs decode and agreement: each
sentence cites the numbers of its own figure or table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import build

from moe_viz import Capacity, TopK, generate, metrics, run_prompt, views
from moe_viz.agreement import agreement
from moe_viz.fragility import edit_diff, noise_sensitivity
from moe_viz.importance import expert_importance
from moe_viz.sweeps import capacity_sweep, k_sweep

TEXT = "what if one expert were switched off in this layer"


@pytest.fixture(scope="module")
def model():
    return build("mixtral")


@pytest.fixture(scope="module")
def native(model):
    return run_prompt(model, TEXT)


def test_importance_views_cite_the_most_important_expert_and_the_rank_correlation(model):
    imp = expert_importance(model, TEXT)
    heat = views.importance_heatmap(imp)
    best = imp.table.loc[imp.table.importance.idxmax()]
    assert f"expert {int(best.expert)} in layer {int(best.layer)}: Δ loss {best.delta_loss:+.4f}" in heat.explanation
    z = views.array_values(heat.figure.data[0].z, dtype=float)
    assert np.nanmax(np.abs(z)) == pytest.approx(abs(best.delta_loss))
    assert "one prompt" in heat.explanation
    layer = int(best.layer)
    scatter = views.importance_vs_load(imp, layer)
    rho = imp.rank_correlation[layer]
    assert (f"ρ = {rho:.2f}" in scatter.explanation) or (math.isnan(rho) and "undefined" in scatter.explanation)
    assert views.array_values(scatter.figure.data[0].x).tolist() == pytest.approx(
        imp.table[imp.table.layer == layer].load_share.tolist()
    )
    with pytest.raises(ValueError, match="ablated layers"):
        views.importance_vs_load(imp, 99)


def test_capacity_sweep_view_names_the_first_factor_that_drops_nothing(model, native):
    effects, drops = capacity_sweep(model, TEXT)
    view = views.capacity_sweep(effects, drops, native.next_token_loss())
    mean = drops.groupby("factor").drop_rate.mean()
    free = mean[mean == 0]
    assert f"From factor {free.index.min():g} on nothing is dropped" in view.explanation
    assert f"At factor {effects.factor.iloc[0]:g}, " in view.explanation
    layers = sorted(drops.layer.unique())
    assert len(view.figure.data) == len(layers) + 2  # a drop-rate line per layer, flips, loss
    table = k_sweep(model, TEXT)
    kview = views.k_sweep(table, model.top_k, native.next_token_loss())
    best = table.loc[table.loss.idxmin()]
    assert f"lowest loss on this prompt is at k = {int(best.k)}" in kview.explanation


def test_paths_table_lists_the_commonest_paths_with_their_independence_ratio(native):
    view = views.paths_table(native, top=5)
    p = metrics.expert_paths(native, top=5)
    assert view.table.tokens.tolist() == [c for _, c, _, _ in p.top]
    first = view.table.iloc[0]
    assert first["× independent"] == pytest.approx(first.share / first["if independent"])
    assert f"{first['× independent']:.3g}× as often" in view.explanation
    one = views.expert_paths(native, positions=[2])
    assert "position 2" in one.explanation and "takes the path" in one.explanation


def test_fragility_views_cite_the_most_fragile_token_and_the_most_sensitive_layer(model, native):
    layer = native.layer_ids[0]
    ranking = views.margin_ranking(native, layer, n=5)
    assert len(ranking.table) == 5 and ranking.table.margin.is_monotonic_increasing
    assert f"position {int(ranking.table.position.iloc[0])}" in ranking.explanation
    ns = noise_sensitivity(model, TEXT, levels=(0.05, 0.5))
    view = views.noise_sensitivity(ns)
    share = ns.share()
    top = share[share.level == 0.5]
    worst = top.loc[top.changed_share.idxmax()]
    assert f"most sensitive layer is {int(worst.layer)}: {int(worst.changed_tokens)} of" in view.explanation
    assert [views.array_values(bar.y).tolist() for bar in view.figure.data] == [
        share[share.level == lv].changed_share.tolist() for lv in ns.levels
    ]
    token = views.token_fragility(native, 3, ns)
    assert token.table.layer.tolist() == native.layer_ids and "changes at noise" in token.table.columns
    diff = edit_diff(native, run_prompt(model, TEXT.replace("one", "two")), layer)
    edit = views.edit_diff(diff)
    assert f"{diff.changed} of the {diff.aligned} shared tokens" in edit.explanation
    assert edit.html.count("class='moe-tok'") == len(diff.table)


def test_generation_views_mark_the_prompt_boundary_and_split_the_load(model):
    gen = generate(model, TEXT, None, max_new_tokens=8)
    layer = gen.trace.layer_ids[0]
    heat, split = views.generation_views(gen.trace, layer)
    boundary = gen.trace.prompt_length
    assert [s.x0 for s in heat.figure.layout.shapes] == [boundary - 0.5]
    assert f"{boundary} prompt tokens to its left" in heat.explanation
    assert "JS divergence" in split.figure.layout.title.text
    assert not any(s for s in views.routing_heatmap(run_prompt(model, TEXT), layer).figure.layout.shapes)


def test_agreement_views_cite_the_least_agreeing_layer_and_list_only_changed_tokens(model, native):
    other = run_prompt(model, TEXT, Capacity(0.5))
    ag = agreement(native, other)
    view = views.agreement_by_layer(ag)
    low = ag.per_layer.loc[ag.per_layer.topk_overlap.idxmin()]
    assert f"lowest in layer {int(low.layer)}" in view.explanation
    layer = native.layer_ids[0]
    tokens = views.agreement_tokens(ag, native, other, layer)
    assert (tokens.table.overlap < 1).all()
    assert f"{len(tokens.table)} of {native.num_tokens} tokens" in tokens.explanation
    same = views.agreement_tokens(agreement(native, native), native, native, layer)
    assert same.table.empty and "same experts in both routings" in same.explanation
    assert views.agreement_by_layer(agreement(native, run_prompt(model, TEXT, TopK(1)))).figure is not None
