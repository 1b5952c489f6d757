"""Each view's explanation cites numbers of its own figure (or table), in every mode.

The views are built once per policy on the default model; each test reads a number from the
sentence and finds the same number in the figure's data, so a chart and its sentence cannot
drift apart.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import moe_viz
from moe_viz import Capacity, Ensemble, TopK, views
from moe_viz.views import View, array_values

PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
POLICIES = {
    "native": None,
    "top-k:1": TopK(1),
    "top-k:3": TopK(3),
    "capacity:0.5": Capacity(0.5),
    "capacity:0.75:probs": Capacity(0.75, priority="probs"),
    "ensemble:gate": Ensemble("gate"),
}
LAYER = 1


@pytest.fixture(scope="module")
def model() -> moe_viz.MoEModel:
    return moe_viz.load_model()


@pytest.fixture(scope="module")
def native(model):
    return moe_viz.run_prompt(model, PROMPT)


@pytest.fixture(scope="module", params=list(POLICIES))
def trace(request, model):
    return moe_viz.run_prompt(model, PROMPT, POLICIES[request.param])


def _ints(pattern: str, text: str) -> tuple[int, ...]:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return tuple(int(g) for g in match.groups())


def test_every_view_holds_one_picture_and_an_explanation(trace, native):
    shown = (
        views.explore_views(trace, LAYER)
        + views.token_views(trace, LAYER, 3)
        + views.balance_views(trace, LAYER)
        + views.compare_views(native, trace, LAYER)
    )
    assert len({v.name for v in shown}) == len(shown) - 1  # layer_load is on both Explore and Load balance
    for view in shown:
        assert isinstance(view, View) and view.title and view.explanation
        assert sum(x is not None for x in (view.figure, view.html, view.table)) == 1


def test_expert_load_text_names_the_tallest_bar(trace):
    view = views.expert_load(trace, LAYER)
    stacked = sum(array_values(bar["y"], dtype=float) for bar in view.figure.data)  # kept + dropped per expert
    if trace.layer(LAYER).every_expert_runs:
        (each,) = _ints(r"carries exactly (\d+) assignments", view.explanation)
        assert set(stacked.tolist()) == {each}
        return
    expert, routed, assignments = _ints(
        r"most assignments in layer \d+ to expert (\d+): (\d+) of (\d+)", view.explanation
    )
    assert int(stacked.argmax()) == expert and int(stacked.max()) == routed
    assert int(stacked.sum()) == assignments


def test_layer_load_text_names_the_hottest_cell_of_the_map(trace):
    view = views.layer_load(trace)
    if "Every cell is at its fair share" in view.explanation:
        assert np.allclose(array_values(view.figure.data[0]["z"], dtype=float), 1.0)
        return
    expert, layer, count, total = _ints(
        r"hottest cell is expert (\d+) in layer (\d+): (\d+) of (\d+) assignments", view.explanation
    )
    heat = view.figure.data[0]
    z = array_values(heat["z"], dtype=float)
    row, col = np.unravel_index(z.argmax(), z.shape)
    assert (col, int(heat["y"][row])) == (expert, layer)
    counts = array_values(heat["customdata"])
    assert counts[row, col] == count and counts[row].sum() == total


def test_routing_heatmap_text_counts_the_marks_it_draws(trace):
    view = views.routing_heatmap(trace, LAYER)
    lt = trace.layer(LAYER)
    marks = {d["name"]: len(array_values(d["x"])) for d in view.figure.data[1:]}
    if lt.index.shape[1] < lt.num_experts:
        match = re.search(r"dots mark (?:the (\d+) experts|the expert) each token", view.explanation)
        k = int(match.group(1) or 1)
        assert k == lt.index.shape[1]
        assert marks["chosen"] == lt.num_tokens * k - lt.dropped_count
    else:
        assert "chosen" not in marks and "no choice is marked" in view.explanation
    if lt.dropped_count:
        (n,) = _ints(r"Crosses mark the (\d+) assignments", view.explanation)
        assert n == marks["dropped"] == lt.dropped_count
    (position,) = _ints(r"\(position (\d+)\), giving", view.explanation)
    p, expert = re.search(r"giving (\d\.\d\d) to expert (\d+)", view.explanation).groups()
    z = array_values(view.figure.data[0]["z"], dtype=float)  # (E, T)
    assert int(z[:, position].argmax()) == int(expert) and f"{z[:, position].max():.2f}" == p


def test_coloured_text_names_the_commonest_colour(trace):
    view = views.coloured_text(trace, LAYER)
    expert, count, total = _ints(
        r"Expert (\d+) is the most common first choice \((\d+) of (\d+) tokens\)", view.explanation
    )
    colour = views.expert_colors(trace.layer(LAYER).num_experts)[expert]
    assert view.html.count(f"background:{colour};") == count + 1  # + its legend chip
    assert view.html.count('class="moe-tok"') == total


def test_router_distribution_names_exactly_the_outlined_experts(trace):
    for position in (0, 5, trace.num_tokens - 1):
        view = views.router_distribution(trace, LAYER, position)
        bars = view.figure.data[0]
        outlined = {e for e, w in enumerate(bars["marker"]["line"]["width"]) if w == 3}
        named = {int(e) for e in re.findall(r"expert (\d+) \(\d\.\d\d\)", view.explanation.split(" The highest")[0])}
        lt = trace.layer(LAYER)
        if lt.index.shape[1] >= lt.num_experts:
            assert not outlined and "every one of the" in view.explanation
        else:
            assert named == outlined == set(lt.index[position].tolist())
            for e in named:
                assert f"expert {e} ({float(array_values(bars['y'])[e]):.2f})" in view.explanation


def test_predictions_text_names_the_first_bar(trace):
    view = views.predictions(trace, 4)
    bars = view.figure.data[0]
    share = re.search(r"predicts `[^`]*` with (\S+?)(,|;)", view.explanation).group(1)
    assert share == views.pct(float(array_values(bars["x"])[0]))


def test_balance_table_text_cites_the_table(trace):
    view = views.balance_table(trace)
    rows = view.table[view.table["layer"] != "all"]
    low, low_layer, high, high_layer = re.search(
        r"CV ranges from (\S+) \(layer (\d+)\) to (\S+) \(layer (\d+)\)", view.explanation
    ).groups()
    assert f"{rows['cv'].min():.2f}" == low and f"{rows['cv'].max():.2f}" == high
    assert rows.loc[rows["cv"].idxmin(), "layer"] == low_layer and rows.loc[rows["cv"].idxmax(), "layer"] == high_layer


def test_router_confidence_text_names_the_lowest_point_of_the_margin_line(trace):
    view = views.router_confidence(trace, LAYER)
    if trace.layer(LAYER).every_expert_runs:  # nothing can flip: no margin line, and the text says why
        assert len(view.figure.data) == 1 and "no routing choice can flip" in view.explanation
        return
    (position,) = _ints(r"the smallest is token (\d+)", view.explanation)
    margin = array_values(view.figure.data[1]["y"], dtype=float)
    assert int(margin.argmin()) == position


def test_coactivation_text_names_the_brightest_cell_among_well_used_experts(trace):
    view = views.coactivation(trace, LAYER)
    heat = view.figure.data[0]
    z = array_values(heat["z"], dtype=float)
    if "no pairs" in view.explanation or "every pair" in view.explanation:
        assert trace.layer(LAYER).applied_k in (1, trace.layer(LAYER).num_experts)
        return
    a, b = _ints(r"when expert (\d+) is chosen, expert (\d+) is chosen too", view.explanation)
    support = re.search(r"fewer than (\d+) tokens are not cited", view.explanation)
    tokens = np.diagonal(array_values(heat["customdata"]))  # tokens per expert a
    eligible = tokens >= (int(support.group(1)) if support else 1)
    assert eligible[a] and np.nanmax(z[eligible]) == z[a, b]
    share = re.search(r"chosen too (\S+) of the time", view.explanation).group(1)
    assert share == views.pct(float(z[a, b]))


def test_reuse_text_cites_the_table_cells(trace):
    view = views.reuse(trace, LAYER)
    cited = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)% of the time \(random: ", view.explanation)]
    table = [float(v.rstrip("%")) for v in view.table["observed"][:2]]
    assert len(cited) == 2 and all(abs(a - b) < 0.051 for a, b in zip(cited, table))
    assert view.table.loc["mean overlap |S_t ∩ S_t+1|", "observed"] in view.explanation


def test_routing_diff_text_counts_the_columns_that_changed(trace, native):
    view = views.routing_diff(native, trace, LAYER)
    changed, total = _ints(r"\*\*(\d+) of (\d+)\*\* tokens", view.explanation)
    code = array_values(view.figure.data[0]["z"])  # (E, T): 2 = reference only, 3 = other only
    assert int(((code == 2) | (code == 3)).any(axis=0).sum()) == changed and code.shape[1] == total


def test_mode_effect_text_counts_the_flip_marks(trace, native):
    view = views.mode_effect(native, trace)
    flips, total = _ints(r"prediction at (\d+) of (\d+) positions", view.explanation)
    assert len(array_values(view.figure.data[1]["x"])) == flips and len(array_values(view.figure.data[0]["y"])) == total


def test_metric_cards_take_their_help_from_the_metric_definitions(trace):
    cards = views.metric_cards(trace, LAYER)
    definitions = {m.definition for m in moe_viz.metrics.METRICS}
    assert cards and all(any(card.help.startswith(d) for d in definitions) for card in cards)


def test_expert_paths_cite_the_commonest_path_against_the_product_of_marginals(trace):
    from moe_viz.metrics import expert_paths, independence_probability

    view = views.expert_paths(trace)
    p = expert_paths(trace)
    path, tokens, share, indep = p.top[0]
    first = torch.stack([moe_viz.metrics.first_choice(lt) for lt in trace.layers], dim=1)
    assert tokens == int((first == torch.tensor(path)).all(dim=1).sum())
    manual = 1.0
    for i, e in enumerate(path):
        manual *= float((first[:, i] == e).double().mean())
    assert indep == pytest.approx(manual) == pytest.approx(independence_probability(p.marginals, path))
    assert f"carries {tokens} of" in view.explanation and " → ".join(f"e{e}" for e in path) in view.explanation
    sankey = view.figure.data[0]
    assert array_values(sankey["link"]["value"]).sum() == trace.num_tokens * (len(trace.layers) - 1)
    assert p.total_correlation >= 0
