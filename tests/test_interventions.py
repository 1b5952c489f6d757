"""Interventions as policies: ablate experts (reroute or zero) and force experts, composed with
top-k, capacity and ensemble, checked against independent computations on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

from moe_viz import Ablate, Capacity, Force, Limits, TopK, parse_policy, run_prompt
from moe_viz._router_math import capacity_for, gate_weights

TEXT = "Interventions ask what if of one prompt."


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


def test_zero_ablation_equals_a_hand_written_hook_that_zeroes_the_expert_weight(mixtral):
    layer, expert = mixtral.sites[0].layer, 3
    router = mixtral.model.get_submodule(mixtral.sites[0].path)

    def zero(module, args, output):  # the nnsight-style edit, written by hand
        logits, weights, index = output
        return logits, weights.masked_fill(index == expert, 0.0), index

    ids = mixtral.tokenizer(TEXT)["input_ids"]
    handle = router.register_forward_hook(zero)
    try:
        with torch.inference_mode():
            expected = mixtral.model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)
    finally:
        handle.remove()
    trace = run_prompt(mixtral, TEXT, Ablate(layer, (expert,), mode="zero"))
    torch.testing.assert_close(trace.output.vocab_logprobs, expected.float(), rtol=1e-5, atol=1e-5)
    lt = trace.layer(layer)
    assert torch.equal(lt.index, lt.native_index)  # the choice is kept
    assert bool((lt.weights[lt.index == expert] == 0).all())


def test_reroute_never_selects_the_ablated_expert_and_keeps_every_other_tokens_choice(mixtral):
    layer, expert = mixtral.sites[0].layer, 2
    native = run_prompt(mixtral, TEXT)
    ablated = run_prompt(mixtral, TEXT, Ablate(layer, (expert,)))
    lt, nt = ablated.layer(layer), native.layer(layer)
    assert expert not in lt.index.tolist()
    untouched = ~(nt.native_index == expert).any(dim=1)  # tokens that had not chosen it
    assert bool(untouched.any()) and bool((~untouched).any())
    assert torch.equal(lt.index[untouched].sort(-1).values, nt.native_index[untouched].sort(-1).values)


def test_ablating_every_expert_but_k_leaves_exactly_those(mixtral):
    layer = mixtral.sites[0].layer
    E, k = mixtral.num_experts, mixtral.top_k
    keep = {1, 6}
    trace = run_prompt(mixtral, TEXT, Ablate(layer, tuple(e for e in range(E) if e not in keep)))
    assert all(set(row) == keep for row in trace.layer(layer).index.tolist()) and len(keep) == k
    with pytest.raises(ValueError, match="ablate at most 6"):
        run_prompt(mixtral, TEXT, Ablate(layer, tuple(range(7))))


def test_forcing_sends_tokens_to_exactly_the_forced_experts_weighted_by_the_architecture(mixtral):
    layer = mixtral.sites[0].layer
    trace = run_prompt(mixtral, TEXT, Force(layer, (4, 7)))
    lt = trace.layer(layer)
    assert all(row == [4, 7] for row in lt.index.tolist())
    torch.testing.assert_close(lt.weights, gate_weights(mixtral.sites[0].spec, lt.router_logits, lt.index))
    some = run_prompt(mixtral, TEXT, Force(layer, (4, 7), positions=(0, 3)))
    st = some.layer(layer)
    assert st.index[0].tolist() == [4, 7] and st.index[3].tolist() == [4, 7]
    assert torch.equal(st.index[1], st.native_index[1])


def test_ablation_composed_with_capacity_drops_what_the_formula_predicts(mixtral):
    layer = mixtral.sites[0].layer
    policy = parse_policy(f"capacity:0.5+ablate:{layer}:0,1")
    assert isinstance(policy, Ablate) and policy.base == Capacity(0.5)
    lt = run_prompt(mixtral, TEXT, policy).layer(layer)
    assert not bool(torch.isin(lt.index, torch.tensor([0, 1])).any())
    T, k, E = lt.num_tokens, lt.top_k, lt.num_experts
    C = capacity_for(0.5, T, k, E)
    routed = torch.bincount(lt.index.reshape(-1), minlength=E)
    assert lt.capacity == [C] and lt.dropped_count == int((routed - C).clamp_min(0).sum())


def test_interventions_read_and_write_as_text_and_are_bounded_like_their_base():
    assert parse_policy("ablate:0:2,5").spec == "ablate:0:2,5"
    assert parse_policy("top-k:1+ablate:1:3:zero") == Ablate(1, (3,), base=TopK(1), mode="zero")
    assert parse_policy("force:0:1,2@0,3") == Force(0, (1, 2), positions=(0, 3))
    assert parse_policy("capacity:1+force:1:0+ablate:1:3").spec == "capacity:1:position+force:1:0+ablate:1:3"
    for bad, message in [
        ("capacity:1+top-k:2", "only interventions"),
        ("ablate:0", "ablate takes"),
        ("ablate:0:x", "comma-separated integers"),
        ("ablate:0:1:cut", "mode must be one of"),
        ("force:0:1,1", "distinct expert ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_policy(bad)
    with pytest.raises(ValueError, match="capacity factor must satisfy"):
        Limits(max_capacity_factor=2.0).check_policy(parse_policy("capacity:8+ablate:0:1"), num_experts=8, top_k=2)


def test_a_layer_the_model_does_not_have_is_refused_with_the_moe_layers_named(mixtral):
    with pytest.raises(ValueError, match=r"names layer 9, which is not an MoE layer .* \[0, 1\]"):
        run_prompt(mixtral, TEXT, Ablate(9, (1,)))
    with pytest.raises(ValueError, match="experts must satisfy 0 <= expert < 8"):
        run_prompt(mixtral, TEXT, Ablate(0, (8,)))
