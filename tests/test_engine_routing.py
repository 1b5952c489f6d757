"""Expert ids and counts from any engine become traces and corpus aggregates with one set of
checks (``moe_viz.engines.routed``), and every view that ids allow works on them; views that need
router scores or predictions refuse with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import build

from moe_viz import metrics, run_prompt, trace_io, views
from moe_viz.agreement import agreement
from moe_viz.corpus.report import corpus_report
from moe_viz.engines import ModelShape, RoutedExperts, counts_to_aggregates, recompute, to_trace, with_tokens

TEXT = "Serving engines record which experts every token took, and nothing else."


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


@pytest.fixture(scope="module")
def computed(mixtral):
    return run_prompt(mixtral, TEXT)


def expert_ids(trace) -> np.ndarray:
    """(T, L, k) the native expert ids of every MoE layer, slot 0 the first choice."""
    return np.stack([lt.native_index.numpy() for lt in trace.layers], axis=1)


def test_an_import_of_expert_ids_routes_every_token_to_the_same_experts_as_the_run_it_came_from(mixtral, computed):
    routed = RoutedExperts("test", expert_ids(computed), tuple(computed.layer_ids), token_ids=computed.token_ids)
    imported = to_trace(routed, ModelShape.of(mixtral))
    assert imported.token_ids == computed.token_ids and imported.tokens == computed.tokens
    for a, b in zip(imported.layers, computed.layers, strict=True):
        assert metrics.membership(a).equal(metrics.membership(b))
        assert metrics.first_choice(a).equal(metrics.first_choice(b))
        assert not a.scores_recorded and a.weights.isnan().all()
    assert not imported.has_predictions and imported.source == "test"


def test_token_ids_one_longer_than_the_routing_lose_their_unrouted_last_token(computed):
    ids = expert_ids(computed)[:-1]  # the engine never ran the last token through the model
    imported = to_trace(RoutedExperts("e", ids, tuple(computed.layer_ids)), token_ids=computed.token_ids)
    assert imported.token_ids == computed.token_ids[:-1]
    assert "last token has no routing" in imported.source


def test_token_ids_of_another_length_are_refused_with_both_counts(computed):
    routed = RoutedExperts("e", expert_ids(computed), tuple(computed.layer_ids))
    with pytest.raises(ValueError, match=rf"token ids must number at least {computed.num_tokens}"):
        to_trace(routed, token_ids=[1, 2, 3])


def test_zero_filled_dense_layers_are_left_out_by_the_model_or_recognised_without_it(computed):
    ids = expert_ids(computed)  # (T, L, k)
    T, L, k = ids.shape
    with_dense = np.concatenate([np.zeros((T, 1, k), ids.dtype), ids], axis=1)  # a dense layer 0, then the MoE ones
    routed = RoutedExperts("vllm", with_dense, tuple(range(L + 1)))
    guessed = to_trace(routed)
    assert guessed.layer_ids == list(range(1, L + 1)) and "zero-filled dense" in guessed.source
    named = to_trace(routed, ModelShape(moe_layers=tuple(range(1, L + 1)), num_experts=8))
    assert named.layer_ids == list(range(1, L + 1))
    for lt, want in zip(named.layers, computed.layers, strict=True):
        assert lt.index.equal(want.native_index)


def test_empty_slots_padding_a_fixed_width_buffer_are_dropped_and_ragged_ones_refused(computed):
    ids = expert_ids(computed)
    T, L, k = ids.shape
    padded = np.concatenate([ids, np.full((T, L, 8 - k), -1, ids.dtype)], axis=2)  # SGLang's top-8 buffer
    imported = to_trace(RoutedExperts("sglang", padded, tuple(range(L))))
    assert [lt.applied_k for lt in imported.layers] == [k] * L
    ragged = padded.copy()
    ragged[3, 0, 1] = -1
    with pytest.raises(ValueError, match="layer 0: token 3 has fewer experts"):
        to_trace(RoutedExperts("sglang", ragged, tuple(range(L))))


def test_an_expert_listed_twice_or_outside_the_model_is_refused(computed):
    ids = expert_ids(computed).copy()
    ids[2, 1, 1] = ids[2, 1, 0]
    with pytest.raises(ValueError, match="token 2 lists an expert twice"):
        to_trace(RoutedExperts("e", ids, tuple(computed.layer_ids)))
    ids = expert_ids(computed).copy()
    ids[0, 0, 0] = 8
    ids[0, 0, 1] = 9
    with pytest.raises(ValueError, match="routes to expert 9, but the model has 8 experts"):
        to_trace(RoutedExperts("e", ids, tuple(computed.layer_ids)), ModelShape(num_experts=8))


def test_expert_ids_of_the_wrong_shape_or_type_are_refused_naming_the_problem():
    with pytest.raises(ValueError, match=r"shape \(tokens, layers, top_k\)"):
        RoutedExperts("e", np.zeros((4, 2), np.int32), (0,))
    with pytest.raises(ValueError, match="must be integers"):
        RoutedExperts("e", np.zeros((4, 2, 2), np.float32), (0, 1))
    with pytest.raises(ValueError, match="hold no token"):
        RoutedExperts("e", np.zeros((0, 2, 2), np.int32), (0, 1))


def test_an_import_round_trips_through_json_and_parquet_with_its_source_and_without_scores(tmp_path, computed):
    imported = to_trace(RoutedExperts("vLLM test", expert_ids(computed), tuple(computed.layer_ids)))
    for save, load, name in (
        (trace_io.save_json, trace_io.load_json, "t.json"),
        (trace_io.save_parquet, trace_io.load_parquet, "t.parquet"),
    ):
        save(imported, tmp_path / name)
        back = load(tmp_path / name)
        assert back.fingerprint() == imported.fingerprint() and back.source == imported.source
        assert not back.layers[0].scores_recorded and back.layers[0].router_probs.isnan().all()


def test_every_view_ids_allow_renders_an_import_and_the_others_refuse_with_the_reason(mixtral, computed):
    routed = RoutedExperts("vLLM test", expert_ids(computed), tuple(computed.layer_ids), token_ids=computed.token_ids)
    imported = to_trace(routed, ModelShape.of(mixtral))
    layer = imported.layer_ids[0]
    shown = views.import_views(imported, layer) + views.explore_views(imported, layer)
    shown += views.balance_views(imported, layer)
    for view in shown:
        assert view.explanation and "nan" not in view.explanation.lower()
    assert "engine recorded" in views.routing_heatmap(imported, layer).explanation
    table = views.balance_table(imported).table
    assert "aux_loss_hf" not in table.columns and "z_loss" not in table.columns
    assert all("loss" not in card.label.lower() for card in views.metric_cards(imported, layer))
    with pytest.raises(ValueError, match="needs the router's scores"):
        views.router_distribution(imported, layer, 0)
    with pytest.raises(ValueError, match="no next-token predictions"):
        views.predictions(imported, 0)
    reasons = " ".join(views.unavailable(imported))
    assert "router's scores" in reasons and "next-token predictions" in reasons
    assert "no predictions" in views.run_summary(imported)


def test_recomputing_an_untouched_import_agrees_everywhere_and_finds_every_altered_row(mixtral, computed):
    ids = expert_ids(computed)
    routed = RoutedExperts("vLLM test", ids, tuple(computed.layer_ids), token_ids=computed.token_ids)
    imported = to_trace(routed, ModelShape.of(mixtral))
    mine = recompute(imported, mixtral)
    same = agreement(imported, mine)
    assert (same.per_layer.topk_overlap == 1.0).all() and (same.per_layer.top1_match == 1.0).all()
    altered = ids.copy()
    changed = [1, 4, 7]
    for t in changed:  # swap the second choice for an expert the token did not take
        altered[t, 1, 1] = next(e for e in range(8) if e not in altered[t, 1])
    drifted = to_trace(
        RoutedExperts("vLLM test", altered, routed.layers, token_ids=routed.token_ids), ModelShape.of(mixtral)
    )
    ag = agreement(drifted, recompute(drifted, mixtral))
    layer = drifted.layer_ids[1]
    rows = ag.tokens(drifted, mine, layer)
    assert sorted(rows.position[rows.overlap < 1].tolist()) == changed
    assert (ag.per_layer.set_index("layer").topk_overlap.drop(layer) == 1.0).all()
    view = views.agreement_tokens(ag, drifted, mine, layer)
    assert f"{len(changed)} of" in view.explanation


def test_recomputing_needs_token_ids_and_the_same_model(mixtral, computed):
    no_ids = to_trace(RoutedExperts("e", expert_ids(computed), tuple(computed.layer_ids)))
    with pytest.raises(ValueError, match="needs the token ids"):
        recompute(no_ids, mixtral)
    with_ids = with_tokens(no_ids, computed.token_ids, mixtral.tokenizer)
    assert with_ids.tokens == computed.tokens
    wrong = RoutedExperts("e", expert_ids(computed)[:, :1], (5,), token_ids=computed.token_ids)
    with pytest.raises(ValueError, match="not the same model"):
        recompute(to_trace(wrong), mixtral)


def test_count_dumps_become_aggregates_whose_loads_are_the_summed_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(4, size=(30, 3, 8)).astype(np.int64)  # (steps, layers, experts)
    counts[:, 1] = 0  # a dense layer: no counts
    agg = counts_to_aggregates(counts, (0, 1, 2), engine="SGLang stat", shape=ModelShape(top_k=2))
    assert agg.meta.layers == (0, 2)
    assert np.array_equal(agg.assigned.sum(axis=(0, 2)), counts[:, [0, 2]].sum(axis=0))
    assert agg.total_tokens == int((counts[:, 0].sum(axis=1) // 2).sum())
    report = corpus_report(agg)
    shown = views.count_views(report, agg, 2)
    assert [v.name for v in shown] == ["count_load", "count_shares", "corpus_coverage"]
    assert "resamples of the run's 30 recorded steps" in shown[1].explanation  # steps, not documents
    assert "document" not in shown[1].explanation and "domain" not in shown[1].explanation
    with pytest.raises(ValueError, match="name the model \\(or give top_k\\)"):
        counts_to_aggregates(counts, (0, 1, 2), engine="SGLang stat")
    with pytest.raises(ValueError, match="must not be negative"):
        counts_to_aggregates(-counts, (0, 1, 2), engine="x", shape=ModelShape(top_k=2))
