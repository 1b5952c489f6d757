"""Sweeps over the capacity factor and k on one prompt, each from one batched forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from moe_viz import Capacity, TopK, metrics, run_prompt
from moe_viz.sweeps import DEFAULT_FACTORS, capacity_sweep, k_sweep

TEXT = "sweep the capacity factor and k over one prompt and watch the drops"


@pytest.fixture(scope="module")
def model():
    return build("mixtral")


def test_drop_rate_never_rises_as_the_factor_grows_and_is_zero_once_c_covers_the_busiest_expert(model):
    effects, drops = capacity_sweep(model, TEXT)
    assert list(effects.factor) == list(DEFAULT_FACTORS) and DEFAULT_FACTORS[0] == 0.25 and DEFAULT_FACTORS[-1] == 4
    first = model.sites[0].layer  # the first MoE layer sees the same input at every factor
    rates = drops[drops.layer == first].sort_values("factor")
    assert all(a >= b for a, b in zip(rates.drop_rate, rates.drop_rate[1:]))
    busiest = int(torch.bincount(run_prompt(model, TEXT).layer(first).native_index.reshape(-1)).max())
    assert all(rate == 0 for c, rate in zip(rates.capacity, rates.drop_rate) if c >= busiest)
    assert rates.drop_rate.iloc[0] > 0


def test_each_sweep_point_equals_its_own_run(model):
    effects, drops = capacity_sweep(model, TEXT, factors=(0.5, 2.0))
    alone = run_prompt(model, TEXT, Capacity(0.5))
    row = drops[(drops.factor == 0.5)].sort_values("layer")
    assert [round(r, 6) for r in row.drop_rate] == [
        round(lt.dropped_count / lt.dropped.numel(), 6) for lt in alone.layers
    ]
    table = k_sweep(model, TEXT)
    assert list(table.k) == list(range(1, model.num_experts + 1))
    native_point = table[table.k == model.top_k].iloc[0]
    assert native_point.mean_kl == pytest.approx(0.0, abs=1e-6) and native_point.flip_rate == 0  # k = native is native
    one = run_prompt(model, TEXT, TopK(1))
    assert table[table.k == 1].iloc[0].loss == pytest.approx(-float(one.output.target_logprob[:-1].mean()), abs=1e-4)
    assert table.compute_share.tolist() == [k / model.num_experts for k in table.k]


def test_bad_sweep_settings_are_refused_with_a_message(model):
    with pytest.raises(ValueError, match="factors must be finite numbers > 0"):
        capacity_sweep(model, TEXT, factors=(0.5, -1.0))
    with pytest.raises(ValueError, match="ks must be integers with 1 <= k <= 8"):
        k_sweep(model, TEXT, ks=(0, 2))


def test_sweep_effects_equal_mode_effect_of_separate_runs_including_points_that_are_not_rerun(model):
    native = run_prompt(model, TEXT)
    effects, drops = capacity_sweep(model, TEXT, factors=(0.5, 8.0))  # 8.0: C = 2T covers any expert
    assert (drops[drops.factor == 8.0].drop_rate == 0).all()
    for factor in (0.5, 8.0):
        alone = run_prompt(model, TEXT, Capacity(factor))
        expected = metrics.mode_effect(native, alone)
        point = effects[effects.factor == factor].iloc[0]
        assert point.mean_kl == pytest.approx(expected.mean_kl, rel=1e-2, abs=1e-6)
        assert point.flip_rate == pytest.approx(expected.flip_rate)
        assert point.loss == pytest.approx(alone.next_token_loss(), abs=1e-4)
    assert effects[effects.factor == 0.5].iloc[0].flip_rate > 0  # the dropping point differs: the test can fail
