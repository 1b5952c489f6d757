"""Metrics on hand-computed examples, and on a tiny Mixtral trace."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import tiny_models
import torch
from hand_traces import SKEWED, make_layer, make_trace
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moe_viz
from moe_viz import metrics, trace_io

# ----------------------------------------------------------------------------- fixtures and builders


@pytest.fixture(scope="module")
def tiny_model() -> moe_viz.MoEModel:
    return tiny_models.build("mixtral")


PROMPT = "The quick brown fox jumps over the lazy dog."


# ----------------------------------------------------------------------------- load and balance
def test_expert_load_counts_kept_and_routed_assignments() -> None:
    lt = make_layer(SKEWED, 4, dropped=[[False, False], [False, True], [True, True], [False, False]])
    assert metrics.expert_load(lt, "routed").tolist() == [4, 2, 1, 1]
    assert metrics.expert_load(lt).tolist() == [3, 1, 0, 1]
    assert metrics.expert_load(lt, "native").tolist() == [4, 2, 1, 1]


def test_cv_is_zero_for_perfectly_balanced_load() -> None:
    b = metrics.balance(make_layer([[0, 1], [2, 3]], 4))
    assert b.cv == 0.0 and b.max_vio == 0.0 and b.gini == 0.0
    assert b.load_entropy_norm == pytest.approx(1.0) and b.diversity == pytest.approx(1.0)
    assert b.fair_share == 1.0 and b.dead_fraction == 0.0


def test_balance_of_skewed_load_matches_hand_computation() -> None:
    b = metrics.balance(make_layer(SKEWED, 4))
    assert b.assignments == 8 and b.fair_share == 2.0
    assert b.cv == pytest.approx(math.sqrt(6 / 4) / 2)  # std of [4,2,1,1] around 2
    assert b.max_vio == pytest.approx(1.0)  # 4 / 2 - 1
    assert b.gini == pytest.approx(10 / 32)  # (-3*1 - 1*1 + 1*2 + 3*4) / (4 * 8)
    assert b.load_entropy == pytest.approx(1.75 * math.log(2))
    assert b.load_entropy_norm == pytest.approx(0.875)
    assert b.effective_experts == pytest.approx(2**1.75)
    assert b.diversity == pytest.approx(2**1.75 / 4)
    assert b.max_share == 0.5 and b.busiest_expert == 0


def test_dead_fraction_counts_unused_experts() -> None:
    assert metrics.balance(make_layer([[0, 1], [0, 1]], 4)).dead_fraction == 0.5


def test_drop_counts_split_fully_and_partially_dropped_tokens() -> None:
    lt = make_layer(SKEWED, 4, dropped=[[False, False], [False, True], [True, True], [False, False]])
    b = metrics.balance(lt)
    assert b.dropped == 3 and b.drop_rate == pytest.approx(3 / 8)
    assert b.fully_dropped_tokens == 1 and b.partially_dropped_tokens == 1
    assert b.load.tolist() == [3, 1, 0, 1] and b.routed.tolist() == [4, 2, 1, 1]


def test_aux_loss_hf_optimum_is_k_and_normalised_optimum_is_one() -> None:
    top1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # f = [.5, .5], P = [.5, .5]
    assert metrics.aux_loss_hf(top1, 1) == pytest.approx(1.0)
    assert metrics.aux_loss_hf(top1, 2) == pytest.approx(2.0)
    lt = make_layer([[0, 1], [1, 0]], 2, probs=torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    b = metrics.balance(lt)
    assert b.aux_loss_hf == pytest.approx(2.0) and b.aux_loss_norm == pytest.approx(1.0)


def test_aux_loss_hf_equals_transformers_load_balancing_loss_func() -> None:
    g = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(17, 8, generator=g) * 2 for _ in range(3))
    for z in logits:
        ref = load_balancing_loss_func((z,), num_experts=8, top_k=2)
        assert metrics.aux_loss_hf(z, 2) == pytest.approx(float(ref), rel=1e-5)
    pooled = load_balancing_loss_func(logits, num_experts=8, top_k=2)
    assert metrics.aux_loss_hf(logits, 2) == pytest.approx(float(pooled), rel=1e-5)


def test_aux_loss_of_real_trace_equals_transformers(tiny_model: moe_viz.MoEModel) -> None:
    trace = moe_viz.run_prompt(tiny_model, PROMPT)
    logits = tuple(lt.router_logits for lt in trace.layers)
    table = metrics.balance_table(trace)
    for i, lt in enumerate(trace.layers):
        ref = float(load_balancing_loss_func((lt.router_logits,), num_experts=8, top_k=2))
        assert metrics.balance(lt).aux_loss_hf == pytest.approx(ref, rel=1e-5)
        assert table.loc[i, "aux_loss_hf"] == pytest.approx(ref, rel=1e-5)
    all_row = table[table["layer"] == "all"].iloc[0]
    assert all_row["aux_loss_hf"] == pytest.approx(float(load_balancing_loss_func(logits, 8, 2)), rel=1e-5)


def test_z_loss_is_squared_logsumexp() -> None:
    assert metrics.z_loss(torch.zeros(3, 4)) == pytest.approx(math.log(4) ** 2)


def test_balance_table_has_a_row_per_layer_an_all_row_and_conventions(tiny_model: moe_viz.MoEModel) -> None:
    trace = moe_viz.run_prompt(tiny_model, PROMPT, moe_viz.Capacity(1.0))
    table = metrics.balance_table(trace)
    assert list(table["layer"]) == [0, 1, "all"]
    assert int(table.iloc[-1]["dropped"]) == sum(lt.dropped_count for lt in trace.layers)
    assert table.loc[0, "dropped"] == trace.layer(0).dropped_count
    assert table.loc[0, "capacity"] == trace.layer(0).capacity[0]
    assert "fair_share" in table.attrs["conventions"]


def test_capacity_check_counts_overflow_over_ceil_capacity() -> None:
    lt = make_layer(SKEWED, 4)  # native load [4, 2, 1, 1], T = 4, k = 2
    check = metrics.capacity_check(lt, 1.0)  # C = ceil(1 * 4 * 2 / 4) = 2
    assert check.capacity == 2 and check.overflow.tolist() == [2, 0, 0, 0] and check.dropped == 2


def test_capacity_check_agrees_with_a_capacity_run_on_layer_zero(tiny_model: moe_viz.MoEModel) -> None:
    native = moe_viz.run_prompt(tiny_model, PROMPT)
    capped = moe_viz.run_prompt(tiny_model, PROMPT, moe_viz.Capacity(1.0))
    assert metrics.capacity_check(native.layer(0), 1.0).dropped == capped.layer(0).dropped_count


def test_capacity_check_rejects_non_positive_factor() -> None:
    with pytest.raises(ValueError, match=r"factor must be a finite number > 0; got 0"):
        metrics.capacity_check(make_layer(SKEWED, 4), 0)


# ----------------------------------------------------------------------------- per-token statistics
def test_router_entropy_is_one_for_uniform_and_zero_for_one_hot() -> None:
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    lt = make_layer([[0, 1], [0, 1]], 4, probs=probs)
    assert metrics.router_entropy(lt).tolist() == pytest.approx([1.0, 0.0])
    assert metrics.router_entropy(lt, normalised=False)[0] == pytest.approx(math.log(4))


def test_topk_margin_is_last_chosen_minus_first_rejected() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    lt = make_layer([[1, 3]], 4, probs=probs)
    assert metrics.topk_margin(lt).tolist() == pytest.approx([0.15])
    assert metrics.topk_margin(lt, k=1).tolist() == pytest.approx([0.2])
    assert metrics.topk_margin(lt, k=4).tolist() == pytest.approx([0.05])


def test_topk_margin_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= 4; got 5"):
        metrics.topk_margin(make_layer(SKEWED, 4), k=5)


def test_metrics_reject_a_non_layer_argument() -> None:
    with pytest.raises(ValueError, match="layer must be a LayerTrace"):
        metrics.balance("layer 0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="which must be one of"):
        metrics.expert_load(make_layer(SKEWED, 4), "all")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- co-activation and reuse
def test_coactivation_is_conditional_on_the_row_expert() -> None:
    co = metrics.coactivation(make_layer([[0, 1], [0, 2], [1, 0], [2, 3]], 4))
    A = co.matrix
    assert A[0, 1].item() == pytest.approx(2 / 3) and A[1, 0].item() == pytest.approx(1.0)
    assert A[0, 2].item() == pytest.approx(1 / 3) and A[2, 0].item() == pytest.approx(0.5)
    assert A[3, 2].item() == pytest.approx(1.0) and A[0, 3].item() == 0.0
    assert torch.isnan(A.diagonal()).all()
    assert co.counts.diagonal().tolist() == [3, 2, 2, 1]
    assert co.baseline == pytest.approx(1 / 3)
    # Experts 1-3 have fewer than 3 tokens, so their 100% shares are not cited; expert 0's best is.
    assert co.min_tokens == 3 and co.top_pair == (0, 1, pytest.approx(2 / 3))


def test_coactivation_cites_a_share_of_one_token_only_when_no_expert_has_more() -> None:
    co = metrics.coactivation(make_layer([[0, 1], [2, 3]], 4))
    assert co.min_tokens == 1 and co.top_pair is not None and co.top_pair[2] == 1.0


def test_reuse_counts_consecutive_overlaps_against_random_baselines() -> None:
    r = metrics.reuse(make_layer([[0, 1], [0, 2], [1, 0], [2, 3]], 4))
    assert r.pairs == 3
    assert r.first_choice_same == pytest.approx(1 / 3)  # first choices 0, 0, 1, 2
    assert r.sets_intersect == pytest.approx(2 / 3) and r.mean_overlap == pytest.approx(2 / 3)
    assert (r.first_choice_baseline, r.intersect_baseline, r.overlap_baseline) == pytest.approx((0.25, 5 / 6, 1.0))


def test_first_choices_are_computed_once_yet_a_caller_cannot_change_them_for_the_next() -> None:
    layer = make_layer([[0, 1], [0, 2], [1, 0], [2, 3]], 4)
    first = metrics.first_choice(layer)
    expected = first.clone()
    first += 1  # a caller that writes into what it got
    assert torch.equal(metrics.first_choice(layer), expected)
    assert metrics.reuse(layer).first_choice_same == pytest.approx(1 / 3)


def test_reuse_baselines_match_the_documented_table() -> None:
    assert metrics.reuse_baselines(8, 2) == pytest.approx((0.125, 0.4643, 0.5), abs=1e-4)
    assert metrics.reuse_baselines(64, 8) == pytest.approx((1 / 64, 0.679, 1.0), abs=1e-3)


# ----------------------------------------------------------------------------- comparing runs
def test_mode_effect_kl_flips_and_delta_logprob_match_hand_computation() -> None:
    lt = make_layer([[0, 1], [1, 2]], 4)
    ref = make_trace([lt], vocab_probs=[[0.5, 0.5], [0.6, 0.4]], target=[math.log(0.5), float("nan")])
    oth = make_trace([lt], vocab_probs=[[0.9, 0.1], [0.2, 0.8]], target=[math.log(0.1), float("nan")], policy="top-k:1")
    e = metrics.mode_effect(ref, oth)
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl1 = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)
    assert e.kl.tolist() == pytest.approx([kl0, kl1], rel=1e-5)
    assert e.mean_kl == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert e.flips.tolist() == [False, True] and e.flip_rate == 0.5 and e.flipped_positions == [1]
    assert e.mean_delta_logprob == pytest.approx(math.log(0.1 / 0.5), rel=1e-5)
    assert math.isnan(e.delta_logprob[1].item())


def test_mode_effect_of_a_run_with_itself_is_zero(tiny_model: moe_viz.MoEModel) -> None:
    trace = moe_viz.run_prompt(tiny_model, PROMPT)
    e = metrics.mode_effect(trace, trace)
    assert e.mean_kl == pytest.approx(0.0, abs=1e-7) and e.flip_rate == 0.0


def test_mode_effect_requires_vocab_logprobs_and_same_tokens() -> None:
    lt = make_layer([[0, 1], [1, 2]], 4)
    ref = make_trace([lt])
    full = make_trace([lt])
    missing = dataclasses.replace(full, output=dataclasses.replace(full.output, vocab_logprobs=None))
    with pytest.raises(ValueError, match="other has no vocab_logprobs"):
        metrics.mode_effect(ref, missing)
    with pytest.raises(ValueError, match="reference has no vocab_logprobs"):
        metrics.mode_effect(missing, ref)
    with pytest.raises(ValueError, match="other must run on the same token ids"):
        metrics.mode_effect(ref, make_trace([lt], token_ids=[5, 6]))


def test_routing_diff_marks_tokens_whose_kept_set_changed() -> None:
    ref = make_trace([make_layer([[0, 1], [1, 2], [2, 3]], 4)])
    oth = make_trace([make_layer([[0, 1], [1, 2], [2, 0]], 4, dropped=[[False, False], [False, True], [False, False]])])
    d = metrics.routing_diff(ref, oth, 0)
    assert d.changed.tolist() == [False, True, True] and d.num_changed == 2
    assert d.added.tolist() == [0, 0, 1] and d.removed.tolist() == [0, 1, 1]
    assert d.other_dropped.tolist() == [0, 1, 0] and d.reference_dropped.tolist() == [0, 0, 0]


def test_routing_diff_rejects_an_unknown_layer() -> None:
    tr = make_trace([make_layer(SKEWED, 4)])
    with pytest.raises(ValueError, match=r"layer must be one of the MoE layers \[0\]; got 7"):
        metrics.routing_diff(tr, tr, 7)


def test_mode_effect_is_computed_once_per_pair_and_again_for_a_new_reference(tiny_model) -> None:
    native = moe_viz.run_prompt(tiny_model, "memo check", None)
    other = moe_viz.run_prompt(tiny_model, "memo check", moe_viz.TopK(1))
    first = metrics.mode_effect(native, other)
    assert metrics.mode_effect(native, other) is first
    fresh = moe_viz.run_prompt(tiny_model, "memo check", None)
    again = metrics.mode_effect(fresh, other)
    assert again is not first and torch.equal(again.kl, first.kl)


def test_balance_table_cached_on_a_trace_equals_a_fresh_computation_and_is_returned_as_a_copy(tiny_model) -> None:
    trace = moe_viz.run_prompt(tiny_model, "memo check", moe_viz.Capacity(0.5))
    cached = metrics.balance_table(trace)
    cached_again = metrics.balance_table(trace)  # served from the statistics cache
    rebuilt = trace_io.from_dict(trace_io.to_dict(trace))  # a new trace object with the same data and no cache
    independent = metrics.balance_table(rebuilt)
    assert len(independent) == len(trace.layers) + 1 and independent["dropped"].iloc[-1] > 0
    pd.testing.assert_frame_equal(cached, independent)
    pd.testing.assert_frame_equal(cached_again, independent)
    assert cached.attrs == independent.attrs and cached.attrs["conventions"]
    assert cached_again is not cached
    native = metrics.balance_table(moe_viz.run_prompt(tiny_model, "memo check"))  # another trace, its own entry
    assert native["dropped"].iloc[-1] == 0 and not native.equals(cached)

    # Mutating a returned table (cells and attrs) must not leak into the next call's result.
    cached.loc[:, "cv"] = -1.0
    cached.loc[cached.index[0], "dropped"] = 10**6
    cached.attrs["conventions"] = "changed"
    after = metrics.balance_table(trace)
    pd.testing.assert_frame_equal(after, independent)
    assert after.attrs == independent.attrs


def test_readme_table_of_metrics_is_the_one_the_code_defines() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert metrics.metrics_markdown_table() in readme
    assert set(metrics.CONVENTIONS) >= {m.name for m in metrics.METRICS}
    assert all(m.name in metrics.TABLE_COLUMNS for m in metrics.METRICS)


def test_balance_table_conventions_serialise_as_json_and_are_shared_read_only(tiny_model) -> None:
    import copy
    import json

    table = metrics.balance_table(moe_viz.run_prompt(tiny_model, "conventions"))
    conventions = table.attrs["conventions"]
    # Streamlit writes a frame's attrs into the Arrow schema as JSON: it must serialise as a dict
    assert json.loads(json.dumps(table.attrs))["conventions"] == dict(metrics.CONVENTIONS)
    assert copy.deepcopy(table).attrs["conventions"] is conventions  # pandas' copies share it
    with pytest.raises(TypeError, match="read-only"):
        conventions["cv"] = "something else"


def test_balance_table_with_its_conventions_survives_pickling(tiny_model, tmp_path) -> None:
    """A table saved with pandas' to_pickle (or kept by Streamlit's cache_data, which pickles) reads
    back with the same conventions, still read-only."""
    table = metrics.balance_table(moe_viz.run_prompt(tiny_model, "conventions"))
    table.to_pickle(tmp_path / "table.pkl")
    back = pd.read_pickle(tmp_path / "table.pkl")
    pd.testing.assert_frame_equal(back, table)
    assert back.attrs["conventions"] == dict(metrics.CONVENTIONS)
    with pytest.raises(TypeError, match="read-only"):
        back.attrs["conventions"]["cv"] = "something else"
