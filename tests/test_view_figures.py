"""Views' figures build for tiny and long traces, with consistent colours, escaping and bounded JSON."""

from __future__ import annotations

import dataclasses

import numpy as np
import plotly.graph_objects as go
import pytest
import tiny_models
from hand_traces import synthetic_trace

import moe_viz
from moe_viz import metrics, views
from moe_viz.trace import Trace
from moe_viz.views import _plotly, array_values

PROMPT = "Hi <script>alert('x')</script> & the quick brown fox."


@pytest.fixture(autouse=True)
def validated_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build figures with plotly's property validation on, so a wrong property fails here."""
    monkeypatch.setattr(_plotly, "VALIDATE", True)


@pytest.fixture(scope="module")
def tiny_model() -> moe_viz.MoEModel:
    return tiny_models.build("mixtral")


@pytest.fixture(scope="module")
def native(tiny_model: moe_viz.MoEModel) -> Trace:
    return moe_viz.run_prompt(tiny_model, PROMPT)


@pytest.fixture(scope="module")
def capped(tiny_model: moe_viz.MoEModel) -> Trace:
    return moe_viz.run_prompt(tiny_model, PROMPT, moe_viz.Capacity(1.0))


def all_figures(trace: Trace, other: Trace, layer: int) -> dict[str, go.Figure]:
    return {
        "heatmap": views.routing_heatmap(trace, layer).figure,
        "layer_load": views.layer_load(trace).figure,
        "bars": views.expert_load(trace, layer).figure,
        "router": views.router_distribution(trace, layer, 3).figure,
        "predictions": views.predictions(trace).figure,
        "coactivation": views.coactivation(trace, layer).figure,
        "mode_effect": views.mode_effect(other, trace).figure,
        "diff": views.routing_diff(other, trace, layer).figure,
    }


def _trace_named(fig: go.Figure, name: str) -> go.BaseTraceType:
    return next(t for t in fig.data if t.name == name)


# ----------------------------------------------------------------------------- colours
def test_expert_colors_are_okabe_ito_up_to_eight_and_distinct_beyond() -> None:
    assert views.expert_colors(8) == _plotly.OKABE_ITO
    assert views.expert_colors(3) == _plotly.OKABE_ITO[:3]
    for n in (18, 60, 64, 128):
        assert len(set(views.expert_colors(n))) == n
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1; got 0"):
        views.expert_colors(0)


def test_expert_colours_are_the_same_in_bars_router_distribution_and_text(capped: Trace) -> None:
    colors = views.expert_colors(8)
    bars = views.expert_load(capped, 0).figure
    assert list(_trace_named(bars, "kept").marker.color) == colors
    assert list(views.router_distribution(capped, 0, 0).figure.data[0].marker.color) == colors
    html_text = views.coloured_text(capped, 0).html
    top1 = metrics.first_choice(capped.layer(0))[0].item()
    assert f"background:{colors[top1]}" in html_text.split('class="moe-tok"')[1]


# ----------------------------------------------------------------------------- each figure on a tiny trace
def test_every_figure_builds_for_a_tiny_trace(native: Trace, capped: Trace) -> None:
    for name, fig in all_figures(capped, native, 1).items():
        assert isinstance(fig, go.Figure), name
        assert fig.layout.title.text, name
    assert "<span" in views.coloured_text(native, 1).html


def test_heatmap_dropped_markers_count_equals_the_trace_dropped_count(capped: Trace) -> None:
    for layer in capped.layer_ids:
        fig = views.routing_heatmap(capped, layer).figure
        lt = capped.layer(layer)
        assert lt.dropped_count > 0
        assert len(array_values(_trace_named(fig, "dropped").x)) == lt.dropped_count
        assert len(array_values(_trace_named(fig, "chosen").x)) == lt.index.numel() - lt.dropped_count
        assert array_values(fig.data[0].z).shape == (8, capped.num_tokens)


def test_heatmap_of_a_native_run_has_no_dropped_markers(native: Trace) -> None:
    names = [t.name for t in views.routing_heatmap(native, 0).figure.data]
    assert "dropped" not in names and "chosen" in names


def test_load_bars_stack_dropped_on_kept_with_a_fair_share_line(capped: Trace) -> None:
    fig = views.expert_load(capped, 0).figure
    lt = capped.layer(0)
    kept, dropped = _trace_named(fig, "kept"), _trace_named(fig, "dropped")
    assert array_values(kept.y).tolist() == lt.load().tolist()
    assert array_values(dropped.y).sum() == lt.dropped_count
    fair = lt.index.numel() / 8
    assert any(abs(s.y0 - fair) < 1e-9 for s in fig.layout.shapes)
    assert any(abs(s.y0 - lt.capacity[0]) < 1e-9 for s in fig.layout.shapes)


def test_layer_load_heatmap_is_relative_to_fair_share(capped: Trace) -> None:
    fig = views.layer_load(capped).figure
    z = array_values(fig.data[0].z)
    assert z.shape == (2, 8)
    assert z.mean() == pytest.approx(1.0, rel=1e-5)
    assert (array_values(fig.data[0].customdata) == metrics.layer_loads(capped, "kept").numpy()).all()


def test_router_distribution_marks_chosen_experts(native: Trace) -> None:
    fig = views.router_distribution(native, 0, 2).figure
    widths = list(fig.data[0].marker.line.width)
    chosen = set(native.layer(0).index[2].tolist())
    assert {e for e, w in enumerate(widths) if w == 3} == chosen
    assert array_values(fig.data[0].y).tolist() == pytest.approx(native.layer(0).router_probs[2].tolist())
    with pytest.raises(ValueError, match="position must be an integer with"):
        views.router_distribution(native, 0, 999)


def test_predictions_bar_shows_the_top_ten_escaped(native: Trace) -> None:
    fig = views.predictions(native, position=0).figure
    assert len(fig.data[0].x) == 10
    assert list(fig.data[0].x) == pytest.approx([p for _, p in native.predictions(0)])


def test_coactivation_heatmap_states_the_baseline(native: Trace) -> None:
    fig = views.coactivation(native, 0).figure
    assert "0.14" in fig.layout.title.text  # (2 - 1) / (8 - 1)
    assert array_values(fig.data[0].z).shape == (8, 8)


def test_mode_effect_figure_marks_every_flip(native: Trace, tiny_model: moe_viz.MoEModel) -> None:
    top1 = moe_viz.run_prompt(tiny_model, PROMPT, moe_viz.TopK(1))
    fig = views.mode_effect(native, top1).figure
    flips = metrics.mode_effect(native, top1).flipped_positions
    assert list(_trace_named(fig, "top-1 flip").x) == flips
    assert len(array_values(_trace_named(fig, "KL").y)) == native.num_tokens


def test_routing_diff_heatmap_codes_each_cell(native: Trace, capped: Trace) -> None:
    fig = views.routing_diff(native, capped, 0).figure
    z = array_values(fig.data[0].z)  # (E, T): 0 neither, 1 both, 2 reference only, 3 other only
    d = metrics.routing_diff(native, capped, 0)
    assert int((z == 1).sum()) == int((d.reference_sets & d.other_sets).sum())
    assert int((z == 2).sum()) == int(d.removed.sum())
    assert len(array_values(_trace_named(fig, "dropped in capacity:1:position").x)) == capped.layer(0).dropped_count


# ----------------------------------------------------------------------------- untrusted text
def test_token_text_html_escapes_script_tags(native: Trace) -> None:
    out = views.coloured_text(native, 0).html
    assert "<script" not in out.lower()
    assert "&lt;" in out and "&#x27;" in out and "&amp;" in out
    assert out.count('class="moe-tok"') == native.num_tokens
    assert "expert 7" in out  # legend


def test_token_text_html_escapes_tokens_inside_titles() -> None:
    trace = synthetic_trace(4, 8, 1, k=2)
    trace = dataclasses.replace(trace, tokens=['"><script>x</script>', "a", "b", "c"])
    out = views.coloured_text(trace, 0).html
    assert "<script" not in out
    assert "&quot;&gt;&lt;script&gt;" in out  # in the span text and in the title attribute
    assert 'title="#0 &#x27;&quot;&gt;' in out


def _listings_one_by_one(experts, scores) -> list[str]:
    return [
        ", ".join(f"e{e} {p:.2f}" for e, p in zip(row_e, row_p, strict=True))
        for row_e, row_p in zip(experts.tolist(), scores.tolist(), strict=True)
    ]


def test_hover_listings_write_scores_as_two_decimal_format_does() -> None:
    """The text's hover titles list scores with two decimals; the fast writer must print the very
    digits Python's two-decimal format prints, half-way cases and scores above 1 (sqrt-softplus
    routers) included."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    stretch = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    scores = torch.rand(500, 8, generator=generator) * stretch
    halfway = torch.tensor([0.125, 0.375, 0.625, 0.875, 0.005, 0.015, 0.045, 1.005])  # float32 ties and near-ties
    scores = torch.cat([scores, halfway.unsqueeze(0)]).float().double()  # (501, 8) float32 values
    experts = torch.randint(0, 300, scores.shape, generator=generator)
    listings = views.routing.score_listings(experts, scores, exact_in_float32=True)
    assert listings == _listings_one_by_one(experts, scores)
    wide = scores + 1e-9  # no longer float32 values: written one by one, the same way
    assert views.routing.score_listings(experts, wide, exact_in_float32=False) == _listings_one_by_one(experts, wide)


def test_axis_labels_escape_tokens(native: Trace) -> None:
    fig = views.routing_heatmap(native, 0).figure
    assert not any("<script" in t for t in fig.layout.xaxis.ticktext)


def test_text_marks_dropped_tokens(capped: Trace) -> None:
    out = views.coloured_text(capped, 0).html
    lt = capped.layer(0)
    per_token = lt.dropped.sum(dim=1)
    assert out.count("line-through") == int((per_token == 2).sum())
    assert out.count("underline dotted") == int((per_token == 1).sum())


# ----------------------------------------------------------------------------- long prompts
LONG_JSON_LIMIT = 600_000  # bytes per figure for 2,000 tokens x 64 experts x 16 layers


def test_long_prompt_figures_are_binned_webgl_and_small() -> None:
    long = synthetic_trace(2000, 64, 16)
    other = synthetic_trace(2000, 64, 16, seed=1)
    other = dataclasses.replace(other, token_ids=list(long.token_ids))
    figs = all_figures(long, other, 5)
    sizes = {name: len(fig.to_json()) for name, fig in figs.items()}
    assert all(size < LONG_JSON_LIMIT for size in sizes.values()), sizes
    heat = figs["heatmap"]
    assert "aggregated into 250 bins of 8" in heat.layout.title.text
    assert array_values(heat.data[0].z).shape == (25, 250)  # 64 experts: the 24 busiest and one row for the other 40
    dropped = _trace_named(heat, "dropped")
    assert int(array_values(dropped.customdata).sum()) == long.layer(5).dropped_count
    assert isinstance(figs["mode_effect"].data[0], go.Scattergl)
    assert figs["layer_load"].data[0].text is None
    assert "bins of 8" in figs["diff"].layout.title.text
    assert len(views.coloured_text(long, 5).html) < 2_000_000


def test_unvalidated_figures_serialise_like_validated_ones(capped: Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setattr(_plotly, "VALIDATE", False)
    fast = views.expert_load(capped, 0).figure
    monkeypatch.setattr(_plotly, "VALIDATE", True)
    checked = views.expert_load(capped, 0).figure
    assert json.loads(fast.to_json())["layout"]["title"] == json.loads(checked.to_json())["layout"]["title"]
    assert list(fast.data[0].marker.color) == list(checked.data[0].marker.color)
    assert len(fast.data) == len(checked.data)


def test_a_chart_sends_the_browser_the_same_json_before_and_after_plotly_builds_its_objects(
    capped: Trace, native: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's chart reaches the browser through ``to_dict`` alone, from the dict the view built
    (no plotly objects); it must be exactly what plotly's own figure of that dict would send."""
    import json

    from moe_viz.views._plotly import wire_json

    monkeypatch.setattr(_plotly, "VALIDATE", False)
    figures = all_figures(capped, native, 0)
    figures |= {
        "confidence": views.router_confidence(capped, 0).figure,
        "paths": views.expert_paths(capped).figure,
        "sankey": views.expert_paths(capped, positions=[0, 2, 3]).figure,
    }
    lazy = [name for name, fig in figures.items() if isinstance(fig, _plotly.LazyFigure)]
    assert len(lazy) >= 9, lazy  # every single-panel chart
    for name, fig in figures.items():
        sent = json.loads(wire_json(fig))
        assert fig.layout.title.text  # any use beyond to_dict builds plotly's figure from the dict
        assert json.loads(wire_json(fig)) == sent, name


def test_a_chart_can_be_edited_copied_and_pickled_like_any_plotly_figure(capped: Trace, monkeypatch) -> None:
    import copy
    import json
    import pickle
    import threading

    from streamlit import type_util  # first: importing Streamlit makes its plotly template the default

    monkeypatch.setattr(_plotly, "VALIDATE", False)
    shown = json.loads(views.expert_load(capped, 0).figure.to_json())
    for clone in (
        copy.deepcopy(views.expert_load(capped, 0).figure),
        pickle.loads(pickle.dumps(views.expert_load(capped, 0).figure)),
    ):
        assert json.loads(clone.to_json()) == shown
    edited = views.expert_load(capped, 0).figure
    edited.update_layout(height=321)
    assert edited.to_dict()["layout"]["height"] == 321
    assert edited.layout.height == 321
    for clone in (copy.deepcopy(edited), pickle.loads(pickle.dumps(edited))):  # copies of a changed chart
        assert json.loads(clone.to_json()) == json.loads(edited.to_json())
        assert set(clone.to_dict()) == {"data", "layout"}
    # Streamlit's st.write knows a plotly figure by its type's name
    assert type_util.is_plotly_chart(views.expert_load(capped, 0).figure)
    # threads that first touch one chart together all see the one figure, built once
    shared = views.expert_load(capped, 0).figure
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.append(len(shared.data))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [len(shared.data)] * 8
    assert json.loads(shared.to_json()) == shown


def test_long_titles_wrap_instead_of_being_cut_off(tiny_model) -> None:
    reference = moe_viz.run_prompt(tiny_model, "a fairly long prompt for a title", None)
    other = moe_viz.run_prompt(tiny_model, "a fairly long prompt for a title", moe_viz.Capacity(0.5, priority="probs"))
    fig = views.routing_diff(reference, other, 0).figure
    assert "<br>" in fig.layout.title.text
    assert all(len(line) <= 72 for line in fig.layout.title.text.split("<br>"))


def test_prediction_labels_stay_categorical_even_when_they_look_like_numbers(tiny_model) -> None:
    trace = moe_viz.run_prompt(tiny_model, "1 2 3 4", None)
    assert views.predictions(trace).figure.layout.yaxis.type == "category"


def test_token_labels_escape_markup_but_keep_quotes_readable() -> None:
    assert views.display_token('<b>"x"</b> & y') == '&lt;b&gt;"x"&lt;/b&gt;␣&amp;␣y'


def test_figures_carry_a_compact_copy_of_the_users_default_template_cut_to_their_trace_types(
    native: Trace, capped: Trace
) -> None:
    import json

    import plotly.io as pio

    previous = pio.templates.default  # Streamlit, once imported by another test, sets its own
    pio.templates.default = "plotly"
    try:
        full = pio.templates["plotly"].to_plotly_json()
        figures = all_figures(native, capped, native.layer_ids[0])
    finally:
        pio.templates.default = previous
    for name, fig in figures.items():
        template = fig.to_plotly_json()["layout"]["template"]
        assert len(json.dumps(template)) < len(json.dumps(full)) / 3, name  # a fraction of the bytes
        assert "geo" not in template["layout"] and "scatter3d" not in template["data"], name
        # a template's trace defaults apply to traces of their own type: each figure keeps its own types' only
        assert set(template["data"]) <= {trace.type for trace in fig.data}, name
        assert "coloraxis" not in template["layout"], name  # no chart of ours uses a shared colour axis
        assert template["layout"]["xaxis"] == full["layout"]["xaxis"], name  # what our charts use is kept
        assert set(template) == {"data", "layout"}, name  # Streamlit's theme writes into both
        for trace in fig.data:  # the template's colour scale was cut: every heatmap names its own
            assert trace.type != "heatmap" or trace.colorscale is not None, name
    try:
        pio.templates.default = "plotly_white"
        fig = views.routing_heatmap(native, native.layer_ids[0]).figure
        assert fig.layout.template.layout.plot_bgcolor == "white"  # a user's choice is followed
    finally:
        pio.templates.default = previous


def test_figure_arrays_are_typed_arrays_exactly_as_plotly_writes_them_and_read_back() -> None:
    from _plotly_utils.utils import to_typed_array_spec  # what plotly itself writes into the JSON

    arrays = [
        np.arange(300, dtype=np.int64),  # shrinks to int16
        np.array([-5, 100], dtype=np.int64),  # int8
        np.array([0, 2**40], dtype=np.int64),  # too wide for plotly.js: left as it is
        np.array([1, 70000], dtype=np.uint64),  # uint32
        np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1),  # 2-D keeps its shape
        np.random.default_rng(0).normal(size=(3, 4)),  # float64
        np.array([True, False]),  # no plotly.js type: left as it is
        np.array(["a", "b"], dtype=object),
        np.zeros(0),
    ]
    for a in arrays:
        ours, plotlys = _plotly.typed_array(a), to_typed_array_spec(a)
        if isinstance(plotlys, dict):
            assert ours == plotlys, a
            assert (array_values(ours) == a).all() and array_values(ours).shape == a.shape
        else:
            assert ours is a, a
