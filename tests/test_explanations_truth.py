"""Explanations are true in every mode, every router family and every edge case.

One test per finding of the explanation audit, on the default model and on tiny DeepSeek-V3
(sigmoid, selection bias, groups, shared expert, dense first layer), Qwen2-MoE (shared expert),
GPT-OSS (top-k then softmax) and Jamba; then a property test over random prompts and policies
that recomputes every expert id, count and percentage a sentence cites from the trace tensors.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build

import moe_viz
from moe_viz import Capacity, Ensemble, TopK, generate, metrics, run_prompt, views
from moe_viz.views import _display, learn, routing

PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
FAMILIES = ["default", "deepseek_v3", "qwen2_moe", "gpt_oss", "jamba"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request) -> moe_viz.MoEModel:
    return moe_viz.load_model() if request.param == "default" else build(request.param)


def every_policy(model: moe_viz.MoEModel) -> list:
    E = model.num_experts
    return [
        None,
        TopK(1),
        TopK(min(3, E)),
        TopK(E),
        Capacity(0.5, priority="position"),
        Capacity(0.5, priority="probs"),
        Ensemble("gate"),
        Ensemble("uniform"),
    ]


def named_experts(text: str) -> set[int]:
    """The experts a router-distribution sentence says the token was sent to."""
    match = re.search(r"is sent to \d+ experts?: (.*?)(?:,\s*carrying|; their)", text)
    assert match, text
    return {int(e) for e in re.findall(r"expert (\d+) \(", match.group(1))}


# ----------------------------------------------------------------------------- findings 1 and 2
def test_router_distribution_names_exactly_the_experts_the_applied_routing_used(model):
    for policy in every_policy(model):
        trace = run_prompt(model, PROMPT, policy)
        for lt in trace.layers:
            for t in range(trace.num_tokens):
                text = views.router_distribution(trace, lt.layer, t).explanation
                if lt.every_expert_runs:
                    assert f"every one of the {lt.num_experts} experts processes it" in text
                    continue
                assert named_experts(text) == set(lt.index[t].tolist()), (policy, lt.layer, t)
                if not lt.scores_decide:  # biased / grouped routers: scores alone do not decide
                    assert "a higher score alone does not win a slot" in text or "not sent to" not in text


def test_sigmoid_scores_are_never_called_probabilities():
    model = build("deepseek_v3")
    trace = run_prompt(model, PROMPT)
    lt = trace.layers[0]
    assert lt.router_family == "sigmoid" and not lt.scores_decide
    texts = [
        views.router_distribution(trace, lt.layer, 3).explanation,
        views.routing_heatmap(trace, lt.layer).explanation,
        learn.router_concept(lt),
    ]
    assert all("probabilit" not in text.replace("not probabilities", "") for text in texts), texts
    assert "sigmoid scores sum to" in texts[0] and "selection bias" in texts[0]
    fig = views.router_distribution(trace, lt.layer, 3).figure
    assert fig.layout.yaxis.title.text == "router score"


def test_generations_name_the_experts_each_generated_token_used():
    model = build("qwen2_moe")
    for policy in (TopK(1), Capacity(0.5), Ensemble("gate")):
        trace = generate(model, "abc", policy, max_new_tokens=4).trace
        lt = trace.layers[-1]
        for t in range(trace.num_tokens):
            text = views.router_distribution(trace, lt.layer, t).explanation
            if not lt.every_expert_runs:
                assert named_experts(text) == set(lt.index[t].tolist())


# ----------------------------------------------------------------------------- finding 3
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_dropping_is_explained_with_the_shared_expert_on_models_that_have_one(family):
    model = build(family)
    trace = run_prompt(model, PROMPT, Capacity(1e-9))  # C = 1: nearly every token loses every expert
    lt = trace.layers[0]
    assert lt.shared_expert
    whole = int(lt.dropped.all(dim=1).nonzero()[0])
    assert (
        "the residual path and the shared expert carries it"
        in views.router_distribution(trace, lt.layer, whole).explanation
    )
    assert "the residual path and the shared expert still carry them" in views.layer_load(trace).explanation
    assert "the residual path and the shared expert" in learn.capacity_concept(trace, lt.layer)
    assert "shared expert" in learn.gate_sum_concept(run_prompt(model, PROMPT), lt.layer, 0)


def test_a_fully_dropped_token_still_gets_the_shared_expert_output():
    """Qwen2-MoE: the block output of a token that lost every expert equals its gated shared expert."""
    model = build("qwen2_moe")
    site = model.sites[0]
    block = model.model.get_submodule(site.path.rsplit(".", 1)[0])
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out: seen.__setitem__("block", out.detach())),
        block.shared_expert.register_forward_hook(lambda m, a, out: seen.__setitem__("shared", out.detach())),
        block.shared_expert_gate.register_forward_hook(lambda m, a, out: seen.__setitem__("gate", out.detach())),
    ]
    try:
        trace = run_prompt(model, PROMPT, Capacity(1e-9))
    finally:
        for hook in hooks:
            hook.remove()
    whole = trace.layer(site.layer).dropped.all(dim=1)  # (T,)
    expected = torch.sigmoid(seen["gate"]) * seen["shared"]  # (T, H)
    got = seen["block"].reshape(-1, expected.shape[-1])
    torch.testing.assert_close(got[whole], expected[whole])
    assert not torch.allclose(got[~whole], expected[~whole])


def test_models_without_a_shared_expert_say_the_residual_path_alone_carries_a_dropped_token():
    model = build("mixtral")
    trace = run_prompt(model, PROMPT, Capacity(1e-9))
    lt = trace.layers[0]
    whole = int(lt.dropped.all(dim=1).nonzero()[0])
    assert "the residual path alone carries it" in views.router_distribution(trace, lt.layer, whole).explanation
    assert "shared" not in views.layer_load(trace).explanation


# ----------------------------------------------------------------------------- finding 4
def test_the_capacity_what_if_says_what_it_is_and_is_exact_in_the_first_moe_layer(model):
    native = run_prompt(model, PROMPT)
    real = run_prompt(model, PROMPT, Capacity(1.0))
    first, last = native.layer_ids[0], native.layer_ids[-1]
    text = views.expert_load(native, first).explanation
    assert f"counted on the model's own top-{native.layer(first).top_k} routing" in text and "exact here" in text
    assert metrics.capacity_check(native.layer(first), 1.0).dropped == real.layer(first).dropped_count
    if last != first:
        assert "an estimate" in views.expert_load(native, last).explanation
    assert "this run's routing" not in views.layer_load(native).explanation


# ----------------------------------------------------------------------------- finding 5
def test_fragility_is_only_claimed_where_a_choice_can_flip_and_at_this_runs_k(model):
    for policy in every_policy(model):
        trace = run_prompt(model, PROMPT, policy)
        for lt in trace.layers:
            text = views.routing_heatmap(trace, lt.layer).explanation
            if lt.every_expert_runs:
                assert "margin" not in text and "no routing choice can flip" in text
            elif not lt.scores_decide:
                assert "does not tell how close a choice was" in text and "margin" not in text
            elif not lt.capture_only:
                fragile, k = (
                    int(x) for x in re.search(r"(\d+) of \d+ tokens? ha(?:s|ve) a top-(\d+) margin", text).groups()
                )
                assert k == lt.applied_k
                probs = lt.router_probs.sort(dim=-1, descending=True).values
                assert fragile == int((probs[:, k - 1] - probs[:, k] < routing.LOW_MARGIN).sum())


# ----------------------------------------------------------------------------- finding 6
def test_generation_under_capacity_states_a_capacity_per_step_and_draws_no_single_line():
    model = build("mixtral")
    trace = generate(model, "abcdefgh", Capacity(0.5), max_new_tokens=8).trace
    lt = trace.layers[0]
    assert len(set(lt.capacity)) > 1
    view = views.expert_load(trace, lt.layer)
    assert f"C grows from {lt.capacity[0]} to {lt.capacity[-1]}" in view.explanation
    assert "more than one step's C" in view.explanation
    assert not any("capacity" in (a.text or "") for a in view.figure.layout.annotations)


# ----------------------------------------------------------------------------- finding 7
def test_balance_numbers_say_which_routing_they_are_computed_on_and_use_the_applied_one():
    model = moe_viz.load_model()
    trace = run_prompt(model, PROMPT, Capacity(0.5))
    view = views.balance_table(trace)
    assert "processed under capacity:0.5:position" in view.title and "aux loss on the native top-2" in view.title
    assert "load each expert processed under `capacity:0.5:position`" in view.explanation
    assert "on the router's own top-2 whatever the mode" in view.explanation
    for lt, row in zip(trace.layers, view.table.itertuples(), strict=False):
        kept = torch.bincount(lt.index[~lt.dropped], minlength=lt.num_experts).double()
        assert row.cv == pytest.approx(float(kept.std(unbiased=False) / kept.mean()))
        assert row.busiest_expert == int(kept.argmax())


# ----------------------------------------------------------------------------- finding 8
def test_coactivation_names_a_well_used_pair_and_warns_about_groups():
    model = build("deepseek_v3")
    trace = run_prompt(model, PROMPT)
    lt = trace.layers[0]
    text = views.coactivation(trace, lt.layer).explanation
    a = int(re.search(r"when expert (\d+) is chosen", text).group(1))
    co = metrics.coactivation(lt)
    assert int(co.counts[a, a]) >= co.min_tokens
    assert "best groups" in text and "independence baseline" in text


def test_compare_diff_counts_dropped_assignments_once():
    model = moe_viz.load_model()
    native, capped = run_prompt(model, PROMPT), run_prompt(model, PROMPT, Capacity(0.5))
    for lt in capped.layers:
        text = views.routing_diff(native, capped, lt.layer).explanation
        gained, lost = (int(x) for x in re.search(r"(\d+) expert assignments? gained and (\d+) lost", text).groups())
        d = metrics.routing_diff(native, capped, lt.layer)
        assert (gained, lost) == (int(d.added.sum()), int(d.removed.sum()))
        if lt.dropped_count:
            by_drops = int(re.search(r"(\d+) of the lost ones were dropped", text).group(1))
            assert (
                by_drops <= lost
                and by_drops + int(re.search(r"(\d+) more dropped", text).group(1) if "more dropped" in text else 0)
                == lt.dropped_count
            )


def test_no_sentence_speaks_of_ensemble_mode_under_top_k_of_every_expert():
    model = moe_viz.load_model()
    native, trace = run_prompt(model, PROMPT), run_prompt(model, PROMPT, TopK(model.num_experts))
    layer = trace.layer_ids[0]
    texts = [v.explanation for v in views.explore_views(trace, layer) + views.balance_views(trace, layer)]
    texts += [v.explanation for v in views.token_views(trace, layer, 2) + views.compare_views(native, trace, layer)]
    assert not any("ensemble" in text.lower() for text in texts)
    assert not any(re.search(r"\b0 of \d+ assignments were dropped.*most in layer", t) for t in texts)


def test_binned_heatmap_counts_the_crosses_it_draws(monkeypatch):
    monkeypatch.setattr(_display, "BIN_THRESHOLD", 64)
    monkeypatch.setattr(_display, "MAX_BINS", 20)
    model = build("mixtral")
    trace = run_prompt(model, "abcdefgh" * 20, Capacity(0.5))
    view = views.routing_heatmap(trace, 0)
    crosses = next(d for d in view.figure.data if d["name"] == "dropped")
    cells, total = (
        int(x) for x in re.search(r"Crosses mark the (\d+) .*? the (\d+) assignments", view.explanation).groups()
    )
    assert (
        cells == len(views.array_values(crosses["x"]))
        and total == int(views.array_values(crosses["customdata"]).sum()) == trace.layer(0).dropped_count
    )


# ----------------------------------------------------------------------------- finding 9
def test_learn_page_concepts_follow_the_router_family():
    default = run_prompt(moe_viz.load_model(), PROMPT)
    deepseek = run_prompt(build("deepseek_v3"), PROMPT)
    gpt_oss = run_prompt(build("gpt_oss"), PROMPT)
    assert "probabilities that sum to 1" in learn.router_concept(default.layers[0])
    assert "not probabilities" in learn.router_concept(deepseek.layers[0])
    assert "softmax over those" in learn.router_concept(gpt_oss.layers[0])
    assert "without an auxiliary loss" in learn.balance_concept(deepseek.layers[0])
    assert "auxiliary loss** pushes" in learn.balance_concept(default.layers[0])
    assert "fixed-size buffer" in learn.CAPACITY_WHY and "expert parallelism" in learn.CAPACITY_WHY


def test_learn_capacity_says_dropped_tokens_keep_their_other_experts_and_never_overflows_at_zero():
    model = moe_viz.load_model()
    layer = model.moe_layers[0]
    capped = run_prompt(model, PROMPT, Capacity(0.5))
    text = learn.capacity_concept(capped, layer)
    assert "keeps its other experts" in text and "Only a token whose every assignment is dropped" in text
    roomy = run_prompt(model, PROMPT, Capacity(8.0))
    assert "nothing is dropped" in learn.capacity_concept(roomy, layer)
    assert "overflow:" not in learn.capacity_concept(roomy, layer)


# ----------------------------------------------------------------------------- finding 10
def test_a_one_token_prompt_reads_correctly():
    model = moe_viz.load_model()
    trace = run_prompt(model, [300])
    layer = trace.layer_ids[0]
    texts = [v.explanation for v in views.explore_views(trace, layer) + views.balance_views(trace, layer)]
    texts += [v.explanation for v in views.token_views(trace, layer, 0)]
    joined = " ".join(texts)
    assert not re.search(r"\b1 (tokens|experts|assignments)\b", joined)
    assert "at most 2 can be used" in views.expert_load(trace, layer).explanation
    assert "Reuse needs at least two tokens" in views.reuse(trace, layer).explanation


def test_numbers_are_rounded_without_changing_their_meaning():
    assert _display.pct(0.125) == "12.5%" and _display.pct(0.5) == "50%" and _display.pct(0.0031) == "0.31%"
    assert _display.times(64 / 6) == "10.7×" and _display.times(2.0) == "2×"
    defs = {m.name: m for m in metrics.METRICS}
    assert "(E − 1)/E" in defs["gini"].definition
    assert "not a minimum" in defs["aux_loss_hf"].definition
    trace = run_prompt(build("mixtral"), "ab")  # 2 tokens x k 2 / 8 experts: fair share 0.5
    assert "fair share of 0.5 " in views.expert_load(trace, 0).explanation
    every = " ".join(v.explanation for v in views.balance_views(trace, 0))
    assert "optimum" not in every and "1/E" not in every


# ----------------------------------------------------------------------------- property test
POLICY_TEXT = st.sampled_from(
    ["native", "top-k:1", "top-k:2", "top-k:3", "top-k:8", "capacity:0.5", "capacity:1:probs", "capacity:0.25:k=3"]
    + ["ensemble:gate", "ensemble:uniform"]
)
PROMPTS = st.text(alphabet="abcdefgh (),.:=+\n", min_size=1, max_size=40).filter(lambda s: s.strip())


@pytest.fixture(scope="module")
def mixtral() -> moe_viz.MoEModel:
    return build("mixtral")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS, spec=POLICY_TEXT, data=st.data())
def test_every_cited_expert_count_and_percentage_equals_the_trace(mixtral, prompt, spec, data):
    trace = run_prompt(mixtral, prompt, moe_viz.parse_policy(spec))
    lt = trace.layers[data.draw(st.integers(0, len(trace.layers) - 1))]
    T, E = lt.num_tokens, lt.num_experts
    t = data.draw(st.integers(0, T - 1))
    routed = torch.bincount(lt.index.reshape(-1), minlength=E)  # (E,)
    kept = torch.bincount(lt.index[~lt.dropped], minlength=E)  # (E,)

    # router distribution: the experts and their scores
    text = views.router_distribution(trace, lt.layer, t).explanation
    if not lt.every_expert_runs:
        for e, score in re.findall(r"expert (\d+) \((\d\.\d\d)\)", text.split(" The highest")[0]):
            assert int(e) in lt.index[t].tolist() and score == f"{float(lt.router_probs[t, int(e)]):.2f}"
        assert named_experts(text) == set(lt.index[t].tolist())

    # expert load: the most-asked expert, its count, its share, the drops
    text = views.expert_load(trace, lt.layer).explanation
    if not lt.every_expert_runs:
        e, r, n, share = re.search(r"to expert (\d+): (\d+) of (\d+) \(([\d.]+%)\)", text).groups()
        assert int(r) == int(routed.max()) == int(routed[int(e)]) and int(n) == T * lt.applied_k
        assert share == _display.pct(int(r) / int(n))
        if lt.capacity:
            kept_e, dropped_e = (int(x) for x in re.search(r"it processed (\d+) and dropped (\d+)", text).groups())
            assert (kept_e, dropped_e) == (int(kept[int(e)]), int(routed[int(e)] - kept[int(e)]))
    dead = re.search(r"(\d+) of \d+ experts processed no token", text)
    assert int(dead.group(1) if dead else 0) == int((kept == 0).sum())

    # coloured text: the commonest first choice
    text = views.coloured_text(trace, lt.layer).explanation
    first = lt.router_probs.masked_fill(~metrics.membership(lt, "routed"), -1).argmax(dim=-1)
    e, count = (int(x) for x in re.search(r"Expert (\d+) is the most common first choice \((\d+) of", text).groups())
    assert count == int(torch.bincount(first, minlength=E).max()) == int((first == e).sum())

    # heatmap: dropped crosses and fragile tokens
    text = views.routing_heatmap(trace, lt.layer).explanation
    if lt.dropped_count:
        assert f"Crosses mark the {lt.dropped_count} assignment" in text
    if not lt.every_expert_runs:
        k = lt.applied_k
        probs = lt.router_probs.sort(dim=-1, descending=True).values
        fragile = int((probs[:, k - 1] - probs[:, k] < routing.LOW_MARGIN).sum())
        assert re.search(rf"\b{fragile} of {T} tokens? ha(s|ve) a top-{k} margin", text)

    # reuse: the shares against the recomputed ones
    text = views.reuse(trace, lt.layer).explanation
    if T > 1:
        same = float((first[:-1] == first[1:]).double().mean())
        assert f"same first-choice expert {_display.pct(same)} of the time" in text
    assert math.isfinite(float(lt.router_probs.sum()))
