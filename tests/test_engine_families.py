"""Per architecture family: native routing is the model's own forward, other policies are real.

Every equality compares two forwards of the same model with the same experts implementation.
Tolerance: 1e-5 absolute on log-probabilities in float32 (observed: exactly 0.0 for native).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TINY_CONFIGS, ByteTokenizer, build, build_family

from moe_viz import Capacity, Ensemble, TopK, generate, run_prompt, wrap_model
from moe_viz._router_math import capacity_for, gate_weights, select_topk

TOL = 1e-5
TEXT = "The quick brown fox: def f(x): return 2 * x  # 42"
FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = build(request.param)
    ids = model.tokenizer(TEXT)["input_ids"]
    with torch.inference_mode():
        reference = model.model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)  # (T, V)
    return request.param, model, reference


def _max_diff(trace, reference) -> float:
    return (trace.output.vocab_logprobs - reference).abs().max().item()


def test_recording_native_routing_leaves_logits_unchanged(family):
    _, model, reference = family
    assert _max_diff(run_prompt(model, TEXT, None), reference) <= TOL


def test_topk_at_native_k_reproduces_the_plain_forward(family):
    _, model, reference = family
    trace = run_prompt(model, TEXT, TopK(model.top_k))
    assert _max_diff(trace, reference) <= TOL
    for lt in trace.layers:
        assert torch.equal(lt.index, lt.native_index)


def test_own_router_maths_reproduces_native_choices_and_weights(family):
    """Our re-implementation (used for every non-native policy) picks the same experts with the
    same weights as the architecture's router at its own k."""
    _, model, _ = family
    trace = run_prompt(model, TEXT, None)
    modules = dict(model.model.named_modules())
    for lt, site in zip(trace.layers, model.sites):
        bias = site.spec.selection_bias(modules[site.path])
        index = select_topk(site.spec, lt.router_logits, site.spec.top_k, bias)
        weights = gate_weights(site.spec, lt.router_logits, index)
        native_sorted, native_order = lt.native_index.sort(dim=-1)
        ours_sorted, ours_order = index.sort(dim=-1)
        assert torch.equal(native_sorted, ours_sorted)
        torch.testing.assert_close(
            lt.native_weights.gather(1, native_order), weights.gather(1, ours_order), atol=1e-6, rtol=1e-5
        )


def test_native_generation_matches_transformers_generate(family):
    _, model, _ = family
    ids = model.tokenizer("Once upon")["input_ids"]
    with torch.inference_mode():
        hf = model.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    ours = generate(model, "Once upon", TopK(model.top_k), max_new_tokens=6).new_token_ids
    assert ours[: len(hf)] == hf


@pytest.mark.parametrize("policy", [TopK(1), Ensemble("gate"), Ensemble("uniform"), Capacity(0.5)], ids=str)
def test_other_policies_change_the_logits(family, policy):
    _, model, reference = family
    assert _max_diff(run_prompt(model, TEXT, policy), reference) > 10 * TOL


def test_huge_capacity_factor_equals_native(family):
    _, model, reference = family
    trace = run_prompt(model, TEXT, Capacity(1000.0))
    assert _max_diff(trace, reference) <= TOL
    assert all(lt.dropped_count == 0 for lt in trace.layers)


@pytest.mark.parametrize("priority", ["position", "probs"])
def test_capacity_drops_exactly_the_overflow_the_formula_predicts(family, priority):
    _, model, _ = family
    factor = 0.75
    trace = run_prompt(model, TEXT, Capacity(factor, priority=priority))
    T = trace.num_tokens
    for lt in trace.layers:
        k, E = lt.top_k, lt.num_experts
        C = math.ceil(factor * T * k / E)
        assert lt.capacity == [C]
        wanted = torch.bincount(lt.index.reshape(-1), minlength=E)  # assignments before capacity
        expected = int(torch.clamp(wanted - C, min=0).sum())
        assert lt.dropped_count == expected
        assert (lt.load() <= C).all()
        assert (lt.weights[lt.dropped] == 0).all()


def test_topk_over_all_experts_equals_gate_ensemble(family):
    _, model, _ = family
    all_k = run_prompt(model, TEXT, TopK(model.num_experts))
    ensemble = run_prompt(model, TEXT, Ensemble("gate"))
    torch.testing.assert_close(all_k.output.vocab_logprobs, ensemble.output.vocab_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["minimax_m3_vl_text"])
def test_a_partial_family_records_exactly_but_refuses_policies_it_cannot_prove(model_type):
    """MiniMax-M3-VL's text router matches no spec of the grammar: its routing is recorded exactly,
    capacity at its own k runs on its own choice, and other k and ensemble are refused."""
    model = wrap_model(build_family(model_type), ByteTokenizer(), model_type)
    ids = model.tokenizer(TEXT)["input_ids"]
    with torch.inference_mode():
        reference = model.model(input_ids=ids).logits[0].log_softmax(-1)
    trace = run_prompt(model, TEXT, None)
    assert trace.capture_only and all(lt.capture_only for lt in trace.layers)
    assert _max_diff(trace, reference) <= TOL
    T = trace.num_tokens
    for lt in trace.layers:  # one router per layer, one row per token
        assert lt.router_logits.shape == (T, lt.num_experts) and lt.native_index.shape == (T, lt.top_k)
    with pytest.raises(ValueError, match="partial support"):
        run_prompt(model, TEXT, TopK(1))
    with pytest.raises(ValueError, match="partial support"):
        run_prompt(model, TEXT, Ensemble("gate"))
    assert run_prompt(model, TEXT, Capacity(0.5)).layers[0].dropped_count > 0


def test_capacity_formula_is_exact_at_integer_boundaries():
    assert capacity_for(1.0, 16, 2, 8) == 4
    assert capacity_for(1.25, 8, 2, 8) == 3  # 2.5 -> 3
    assert capacity_for(0.1, 30, 1, 3) == 1  # 0.1*30/3 = 1.0 exactly, not 1.0000000000000002
