"""Views of routing imported from a serving or training engine (``moe_viz.engines``).

Engines record which experts each token took, not how strongly the router preferred them, and no
next-token distribution. A per-token import gets every view that expert ids allow (the routed
heatmap here, coloured text, loads, balance, co-activation, reuse, paths) and ``unavailable``
names the rest with the reason, for the page to say. A count-only dump gets the corpus views that
counts allow (``count_views``).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch

from .. import metrics
from ..corpus.aggregates import CorpusAggregates
from ..corpus.report import CorpusReport
from ..trace import Trace
from ._display import bin_mean, bin_note, pct, plural, token_bins
from ._experts import expert_rows_axis, focus_sentence, focused_rows
from ._plotly import SEQUENTIAL, FigureBuilder, expert_axis, f32, finish, plotly_trace, token_axis
from ._view import View
from .balance import balance_table, coactivation, expert_load, layer_load, load_map, reuse
from .corpus import TOP_LEGEND, _error, _layer_index, ci_text, coverage_curves, intervals_note, reference_line
from .paths import expert_paths
from .routing import coloured_text


def routed_heatmap(trace: Trace, layer: int, experts: list[int] | None = None) -> View:
    """Which experts each token was sent to, as the engine recorded it: 1 where routed (the share
    of a bin's tokens on long sequences), no scores. Above 16 experts the busiest (or ``experts``)
    get a row each and the rest share one row (its cells count the tokens' folded experts)."""
    lt = trace.layer(layer)
    T, E = lt.num_tokens, lt.num_experts
    size = token_bins(T)
    routed, rows, focus = focused_rows(bin_mean(metrics.membership(lt, "routed").float(), size), lt, experts)
    x = np.arange(routed.shape[0]) * size if size > 1 else np.arange(T)
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(routed.t()),
            x=x,
            y=rows,
            colorscale=SEQUENTIAL,
            zmin=0.0,
            zmax=1.0 if not focus.folded else None,
            showscale=size > 1 or focus.folded,
            colorbar={"title": {"text": "share of the bin's tokens"}},
            hovertemplate=(
                "position %{x}<br>expert %{y}: %{z:.0f} (1 = routed)<extra></extra>"
                if size == 1
                else "bin from %{x}<br>expert %{y}: %{z:.0%} of its tokens<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title={"text": f"Experts each token was sent to, layer {layer} (recorded by the engine)" + bin_note(size, T)},
        plot_bgcolor="#FFFFFF",
    )
    token_axis(fig, trace, size)
    expert_rows_axis(fig, focus, rows)
    load = metrics.expert_load(lt, "routed")  # (E,)
    busiest = int(load.argmax())
    unused = int((load == 0).sum())
    cells = "Each bright cell is an expert a token was sent to" if size == 1 else "Brighter cells hold more tokens"
    text = (
        f"{cells}: {plural(T, 'token')} × {lt.applied_k} experts in layer {layer}, as the engine recorded them. "
        f"The engine kept expert ids, not router scores, so the map shows where tokens went, not how sure the router "
        f"was. Expert {busiest} takes the most tokens ({int(load[busiest])} of {T}, {load[busiest] / T:.0%})"
    )
    text += f"; {plural(unused, 'expert')} of {E} take none." if unused else f"; all {E} experts take some."
    if focus.folded:
        text += " " + focus_sentence(focus, layer)
    return View("routing_heatmap", f"Token × expert routing, layer {layer}", text, figure=finish(fig))


def import_views(trace: Trace, layer: int) -> list[View]:
    """The Import page for a per-token import, top to bottom: every view expert ids allow."""
    ranked = all(lt.first_choice_known for lt in trace.layers)  # the views below that read first choices
    return [
        routed_heatmap(trace, layer),
        *([coloured_text(trace, layer)] if ranked else []),
        expert_load(trace, layer),
        layer_load(trace),
        balance_table(trace),
        coactivation(trace, layer),
        *([reuse(trace, layer), expert_paths(trace)] if ranked else []),
    ]


def unavailable(trace: Trace) -> list[str]:
    """The views an import cannot have, each with its reason (empty for a trace moe-viz computed)."""
    missing = []
    if not trace.scores_recorded:
        missing.append(
            "router distributions, router confidence, top-k margins and the aux / z-losses need the router's "
            "scores, which the engine did not record"
        )
    if not all(lt.first_choice_known for lt in trace.layers):
        missing.append(
            "the coloured text, consecutive-token reuse and expert paths need each token's first choice, and the "
            "engine listed experts by id without scores (Megatron: add the logits sidecar)"
        )
    if not trace.has_predictions:
        missing.append("next-token predictions need the model's output, which the engine's routing does not hold")
    if trace.token_ids and trace.token_ids[0] < 0:
        missing.append("token text needs the token ids: give them with the file (or the request's ids)")
    return missing


def count_load(agg: CorpusAggregates) -> View:
    """Layer x expert load of a count-only import, relative to each layer's fair share."""
    loads = torch.from_numpy(agg.assigned.sum(axis=(0, 2)))  # (L, E)
    fig, text = load_map(loads, list(agg.meta.layers), "recorded", agg.meta.policy)
    text += (
        f" Counted over {agg.chunks_done:,} recorded steps ({agg.total_tokens:,} tokens at k = {agg.meta.top_k[0]})."
    )
    return View("count_load", "Layer × expert load", text, figure=finish(fig))


def count_shares(report: CorpusReport, layer: int) -> View:
    """One layer's share of assignments per expert over the recorded steps, with intervals that
    resample whole steps, against the balanced share 1/E."""
    li = _layer_index(report, layer)
    share = report.domain.share  # (L, 1, E): a count import has one domain, "all"
    E = share.value.shape[-1]
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=list(range(E)),
            y=share.value[li, 0],
            marker={"color": "#0072B2"},
            error_y=_error(share, li, 0, slice(None)),
            name="share",
            hovertemplate="expert %{x}: %{y:.2%} of the layer's assignments<extra></extra>",
        )
    )
    fig.add_trace(reference_line(E, 1 / E, f"balanced 1/{E} = {pct(1 / E)}"))
    fig.update_layout(
        title={"text": f"Share of layer {layer}'s assignments per expert, over the recorded steps"},
        yaxis={"title": {"text": "share of assignments"}, "tickformat": ".1%"},
        legend=TOP_LEGEND,
        plot_bgcolor="#FFFFFF",
    )
    expert_axis(fig, E, "x")
    busiest = int(np.nanargmax(share.value[li, 0]))
    quietest = int(np.nanargmin(share.value[li, 0]))
    above = sum(share.excludes(1 / E, li, 0, e) and share.value[li, 0, e] > 1 / E for e in range(E))
    below = sum(share.excludes(1 / E, li, 0, e) and share.value[li, 0, e] < 1 / E for e in range(E))
    text = (
        f"Each bar is an expert's share of the assignments layer {layer} recorded; balanced routing puts every expert "
        f"at the dashed line, 1/{E} = {pct(1 / E)}. Expert {busiest} takes the most, "
        f"{ci_text(*share.at(li, 0, busiest), pct)}; expert {quietest} the least, "
        f"{ci_text(*share.at(li, 0, quietest), pct)}. The intervals of {plural(above, 'expert')} lie above the "
        f"balanced share and of {below} below it. " + intervals_note(report)
    )
    return View("count_shares", f"Expert share, layer {layer}", text, figure=finish(fig))


def count_views(report: CorpusReport, agg: CorpusAggregates, layer: int) -> list[View]:
    """A count-only import, top to bottom: the load map, one layer's expert shares with their
    intervals (over resampled steps) and the coverage curves."""
    return [count_load(agg), count_shares(report, layer), coverage_curves(report)]
