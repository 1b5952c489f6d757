"""Routing fragility (margins, router-input noise, prompt edits), agreement between two routings
and prefill vs decode, each checked against an independent computation on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_models import build

from moe_viz import Capacity, Limits, TopK, generate, metrics, run_prompt, trace_io
from moe_viz.agreement import agreement
from moe_viz.fragility import edit_diff, margin_ranking, noise_sensitivity
from moe_viz.phases import js_divergence, phase_split

TEXT = "Fragile routing choices sit at small margins between experts."


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


# ----------------------------------------------------------------------------- margins
def test_margin_ranking_puts_the_smallest_top_k_margin_first_and_names_the_runner_up(mixtral):
    trace = run_prompt(mixtral, TEXT)
    layer = trace.layer_ids[0]
    ranking = margin_ranking(trace, layer)
    margin = metrics.topk_margin(trace.layer(layer))  # (T,)
    assert len(ranking) == trace.num_tokens
    assert ranking.margin.is_monotonic_increasing
    assert ranking.position.iloc[0] == int(margin.argmin())
    probs = trace.layer(layer).router_probs
    for row in ranking.head(5).itertuples():
        order = probs[row.position].argsort(descending=True).tolist()
        assert row.chosen == f"e{order[0]}, e{order[1]}" and row.runner_up == f"e{order[2]}"


def test_margin_ranking_is_refused_where_scores_do_not_decide_the_choice():
    deepseek = build("deepseek_v3")  # a selection bias: the scores alone are not the choice
    trace = run_prompt(deepseek, TEXT)
    with pytest.raises(ValueError, match="selection bias"):
        margin_ranking(trace, trace.layer_ids[0])
    ensemble = run_prompt(build("mixtral"), TEXT, TopK(8))
    with pytest.raises(ValueError, match="every expert runs"):
        margin_ranking(ensemble, ensemble.layer_ids[0])


# ----------------------------------------------------------------------------- noise
def _independent_noise_changes(model, text, layer, level, seed):
    """The same measurement written by hand: capture the router's input with a plain hook, add the
    documented noise, call the router, compare top-k sets."""
    site = next(s for s in model.sites if s.layer == layer)
    router = model.model.get_submodule(site.path)
    seen = {}

    def capture(module, args, output):
        seen["x"], seen["logits"] = args[0].detach(), output[0].detach()

    handle = router.register_forward_hook(capture)
    try:
        with torch.inference_mode():
            model.model(input_ids=model.tokenizer(text, return_tensors="pt")["input_ids"], use_cache=False)
            x = seen["x"].reshape(-1, seen["x"].shape[-1]).float()  # (T, d)
            gen = torch.Generator().manual_seed(seed * 100_003 + layer)
            direction = torch.randn(x.shape, generator=gen)
            direction = direction / direction.norm(dim=-1, keepdim=True)
            noisy = x + level * x.norm(dim=-1, keepdim=True) * direction
            out = router.forward(noisy.to(seen["x"].dtype))
    finally:
        handle.remove()
    k = site.spec.top_k
    clean = seen["logits"].reshape(-1, site.spec.num_experts).topk(k).indices.sort().values
    perturbed = out[0].topk(k).indices.sort().values
    return (clean != perturbed).any(dim=-1)


def test_noise_sensitivity_equals_a_hand_written_perturbation_of_the_router_input(mixtral):
    ns = noise_sensitivity(mixtral, TEXT, levels=(0.05, 0.5), seed=7)
    for i, layer in enumerate(ns.layers):
        for j, level in enumerate(ns.levels):
            expected = _independent_noise_changes(mixtral, TEXT, layer, level, seed=7)
            assert torch.equal(ns.changed[i, j], expected), (layer, level)
    assert int(ns.changed[:, -1].sum()) > 0  # at 50% noise some choice changes: the test can fail


def test_noise_probe_leaves_the_forward_native_and_reruns_give_the_same_answer(mixtral):
    before = run_prompt(mixtral, TEXT).output.vocab_logprobs
    a = noise_sensitivity(mixtral, TEXT, seed=3)
    b = noise_sensitivity(mixtral, TEXT, seed=3)
    assert torch.equal(a.changed, b.changed) and a.levels == (0.01, 0.05, 0.1)
    torch.testing.assert_close(run_prompt(mixtral, TEXT).output.vocab_logprobs, before)
    share = a.share()
    assert len(share) == len(a.layers) * 3 and share.changed_share.between(0, 1).all()
    with pytest.raises(ValueError, match="levels must be relative noise sizes"):
        noise_sensitivity(mixtral, TEXT, levels=(0.0, 0.1))
    with pytest.raises(ValueError, match="seed must be an integer"):
        noise_sensitivity(mixtral, TEXT, seed="x")


# ----------------------------------------------------------------------------- prompt edits
def test_identical_prompts_align_every_token_and_change_no_routing(mixtral):
    trace = run_prompt(mixtral, TEXT)
    diff = edit_diff(trace, run_prompt(mixtral, TEXT), trace.layer_ids[0])
    assert diff.aligned == trace.num_tokens and diff.changed == 0
    assert set(diff.table.status) == {"same routing"}
    assert all(share == 0 for share in diff.changed_share_per_layer.values())


def test_an_edit_marks_inserted_and_removed_tokens_and_exactly_the_aligned_tokens_whose_experts_changed(mixtral):
    original = run_prompt(mixtral, "the cat sat on the mat")
    edited = run_prompt(mixtral, "the dog sat on the mat")  # byte tokens: 'cat' -> 'dog'
    layer = original.layer_ids[-1]
    diff = edit_diff(original, edited, layer)
    table = diff.table
    assert (table.status == "removed").sum() + (table.status.isin(["same routing", "changed routing"])).sum() == 22
    assert (table.status == "inserted").sum() == edited.num_tokens - diff.aligned
    a = metrics.membership(original.layer(layer), "kept")
    b = metrics.membership(edited.layer(layer), "kept")
    aligned = table[(table.original_position >= 0) & (table.edited_position >= 0)]
    for row in aligned.itertuples():
        moved = bool((a[row.original_position] != b[row.edited_position]).any())
        assert (row.status == "changed routing") == moved
        assert original.tokens[row.original_position] == edited.tokens[row.edited_position]
    assert diff.changed == int((aligned.status == "changed routing").sum())
    with pytest.raises(ValueError, match="one policy"):
        edit_diff(original, run_prompt(mixtral, "the dog sat on the mat", TopK(1)), layer)


# ----------------------------------------------------------------------------- agreement
def test_a_routing_agrees_fully_with_itself_and_top_1_routing_overlaps_native_top_2_by_half(mixtral):
    native = run_prompt(mixtral, TEXT)
    same = agreement(native, run_prompt(mixtral, TEXT))
    assert (same.per_layer.topk_overlap == 1).all() and (same.per_layer.top1_match == 1).all()
    one = agreement(native, run_prompt(mixtral, TEXT, TopK(1)))
    # top-1 is native's first choice, so every token shares exactly 1 of k = 2 experts
    assert (one.per_layer.topk_overlap == 0.5).all() and (one.per_layer.top1_match == 1).all()


def test_agreement_counts_a_fully_dropped_token_as_no_top_1_match(mixtral):
    native = run_prompt(mixtral, TEXT)
    capped = run_prompt(mixtral, TEXT, Capacity(0.25))
    ag = agreement(native, capped)
    layer = native.layer_ids[0]
    lt = capped.layer(layer)
    empty = lt.dropped.all(dim=-1)  # (T,) tokens with every assignment dropped
    assert bool(empty.any())
    assert not bool(ag.top1[0][empty].any())
    tokens = ag.tokens(native, capped, layer)
    assert (tokens.experts_b[empty.numpy()] == "").all()


def test_agreement_refuses_traces_of_different_tokens_or_architectures(mixtral):
    a = run_prompt(mixtral, TEXT)
    with pytest.raises(ValueError, match="same token ids"):
        agreement(a, run_prompt(mixtral, TEXT + "!"))
    with pytest.raises(ValueError, match="same MoE layers"):
        agreement(a, replace(a, layers=a.layers[:1]))
    wider = replace(a.layers[0], num_experts=16)
    with pytest.raises(ValueError, match="b has 16 experts, a has 8"):
        agreement(a, replace(a, layers=[wider, *a.layers[1:]]))


# ----------------------------------------------------------------------------- prefill vs decode
def test_prefill_and_decode_loads_add_up_to_the_generation_and_mark_the_boundary(mixtral):
    gen = generate(mixtral, TEXT, None, max_new_tokens=6)
    split = phase_split(gen.trace)
    T, boundary = gen.trace.num_tokens, gen.trace.prompt_length
    assert split.boundary == boundary == mixtral.tokenizer(TEXT)["input_ids"].numel()
    for i, lt in enumerate(gen.trace.layers):
        kept = metrics.membership(lt, "kept").double()
        torch.testing.assert_close(split.prompt_shares[i], metrics.load_shares(kept[:boundary].sum(0)))
        torch.testing.assert_close(split.generated_shares[i], metrics.load_shares(kept[boundary:].sum(0)))
        rows = split.table[split.table.layer == lt.layer].set_index("phase")
        assert rows.loc["prompt", "tokens"] == boundary and rows.loc["generated", "tokens"] == T - boundary
    with pytest.raises(ValueError, match="no generated tokens"):
        phase_split(run_prompt(mixtral, TEXT))


def test_js_divergence_is_zero_for_equal_loads_and_ln_2_for_disjoint_ones():
    assert js_divergence(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 6.0])) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.693147, abs=1e-6)


# ----------------------------------------------------------------------------- paths for chosen tokens
def test_paths_of_tokens_matching_a_pattern_use_the_marginals_of_those_tokens_only(mixtral):
    trace = run_prompt(mixtral, TEXT)
    positions = metrics.positions_matching(trace, "^[aeiou]$")
    assert positions == [t for t, tok in enumerate(trace.tokens) if tok in "aeiou" and tok]
    p = metrics.expert_paths(trace, positions=positions)
    assert p.positions == positions and p.paths.shape[0] == len(positions)
    for path, _, _, indep in p.top:
        expected = 1.0
        for i, e in enumerate(path):
            expected *= float((p.paths[:, i] == e).double().mean())
        assert indep == pytest.approx(expected)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        metrics.positions_matching(trace, "([")


# ----------------------------------------------------------------------------- untrusted trace files
def test_a_malformed_trace_file_is_refused_with_a_message_not_a_crash(mixtral):
    data = trace_io.to_dict(run_prompt(mixtral, TEXT))
    missing = json.loads(json.dumps(data))
    del missing["layers"][0]["index"]
    out_of_range = json.loads(json.dumps(data))
    out_of_range["layers"][0]["index"][0][0] = 99
    short = json.loads(json.dumps(data))
    short["layers"][0]["router_probs"] = short["layers"][0]["router_probs"][:-1]
    for bad in (missing, out_of_range, short, {"schema": "moe-viz/trace", "schema_version": 1}):
        with pytest.raises(ValueError, match="not a valid moe-viz trace"):
            trace_io.from_json_text(json.dumps(bad))


def test_hosted_limits_bound_the_token_rows_of_an_analysis_and_say_how_to_fit():
    limits = Limits(max_analysis_tokens=4096)
    limits.check_analysis("The ablation grid", 4, 8, 128)  # exactly 4096: allowed
    with pytest.raises(
        ValueError, match=r"4 forward\(s\) of 8 copies of the 200-token prompt.*Shorten the prompt to 128 tokens"
    ):
        limits.check_analysis("The ablation grid", 4, 8, 200)
    Limits().check_analysis("anything", 100, 100, 10_000)  # local: unbounded


def test_one_tokens_margin_and_rank_are_its_row_of_the_layers_margin_ranking(mixtral):
    from moe_viz.fragility import token_margin

    trace = run_prompt(mixtral, TEXT)
    layer = trace.layer_ids[1]
    ranking = margin_ranking(trace, layer)
    for rank, row in enumerate(ranking.itertuples(), start=1):
        one = token_margin(trace, layer, row.position)
        assert (one.rank, one.margin, one.chosen, one.runner_up) == (rank, row.margin, row.chosen, row.runner_up)
        assert one.tokens == trace.num_tokens
