"""Views of routing fragility: the tokens nearest a different choice, the share of choices that a
small perturbation of the router input changes, one token's fragility in every layer, and the
routing of a prompt against an edited version of it."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

from .. import fragility as frag
from ..trace import Trace
from ._display import LIST_LAYERS, code_token, display_token, num, pct, plural, visible
from ._plotly import FigureBuilder, finish, plotly_trace
from ._view import View

LEVEL_COLORS = ["#56B4E9", "#E69F00", "#D55E00", "#CC79A7", "#009E73"]


def margin_ranking(trace: Trace, layer: int, n: int = 10) -> View:
    """The ``n`` tokens with the smallest top-k margin in ``layer`` (most fragile first)."""
    ranking = frag.margin_ranking(trace, layer)
    lt = trace.layer(layer)
    top = ranking.head(n).copy()
    top["token"] = [visible(t) for t in top["token"]]
    first = ranking.iloc[0]
    median = float(ranking["margin"].median())
    text = (
        f"Tokens of layer {layer} ranked by their top-{lt.applied_k} margin: the last chosen minus the first "
        f"left-out router {lt.score_name}. The most fragile is {code_token(str(first.token))} (position "
        f"{int(first.position)}): margin {num(float(first.margin))}, chosen {first.chosen}, next in line "
        f"{first.runner_up}. The median margin over the {plural(len(ranking), 'token')} is {num(median)}; a "
        "small change to the router's input could swap the experts of the tokens at the top of this table."
    )
    return View("margin_ranking", f"Most fragile routing choices, layer {layer}", text, table=top)


def noise_sensitivity(ns: frag.NoiseSensitivity) -> View:
    """Grouped bars: per layer, the share of tokens whose top-k set changed at each noise level."""
    share = ns.share()
    fig = FigureBuilder()
    for j, level in enumerate(ns.levels):
        s = share[share["level"] == level]
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=[str(layer) for layer in s["layer"]],
                y=s["changed_share"].to_numpy(),
                name=f"{level:.0%} noise",
                marker={"color": LEVEL_COLORS[j % len(LEVEL_COLORS)]},
                customdata=s["changed_tokens"].to_numpy(),
                hovertemplate=f"layer %{{x}}, {level:.0%} noise: %{{customdata}} tokens (%{{y:.1%}})<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": f"Tokens whose top-{ns.k} set changes under router-input noise (seed {ns.seed})"},
        barmode="group",
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        yaxis={"title": {"text": "share of tokens"}, "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.2},
        plot_bgcolor="#FFFFFF",
    )
    top_level = ns.levels[-1]
    at_top = share[share["level"] == top_level]
    worst = at_top.loc[at_top["changed_share"].idxmax()]
    first = share[share["level"] == ns.levels[0]]
    text = (
        f"Each router's input x (the hidden state of every token) gets seeded Gaussian noise of size "
        f"{', '.join(f'{x:.0%}' for x in ns.levels)} of ‖x‖, one router at a time on the model's own hidden states, "
        f"and we count the tokens whose set of top-{ns.k} experts changes. At {top_level:.0%} noise the most "
        f"sensitive layer is {int(worst.layer)}: {int(worst.changed_tokens)} of {plural(int(worst.tokens), 'token')} "
        f"({pct(float(worst.changed_share))}) change experts; at {ns.levels[0]:.0%} noise "
        f"{int(first['changed_tokens'].sum())} token choices change over all layers."
    )
    if ns.skipped:
        text += " Not probed: " + "; ".join(f"layer {k} ({v})" for k, v in sorted(ns.skipped.items())) + "."
    return View("noise_sensitivity", "Routing under router-input noise", text, figure=finish(fig))


def _noise_layers(hit: dict[int, float], layers: int) -> str:
    """'layer 0 (from 5%), layer 3 (from 10%)', or at many layers 'd of L layers, first at ...'."""
    if len(hit) <= LIST_LAYERS:
        return ", ".join(f"layer {layer} (from {level:.0%})" for layer, level in hit.items())
    lowest = min(hit.values())
    first = [layer for layer, level in hit.items() if level == lowest]
    return (
        f"{len(hit)} of {layers} layers; from {lowest:.0%} noise already in layers "
        + ", ".join(map(str, first[:LIST_LAYERS]))
        + (" …" if len(first) > LIST_LAYERS else "")
    )


def token_fragility(trace: Trace, position: int, ns: frag.NoiseSensitivity | None = None) -> View:
    """One token in every layer: its top-k margin, its rank among the prompt's tokens (1 = most
    fragile) and, when a noise measurement of the same tokens is given, the smallest noise level
    that changed its experts."""
    position = trace.check_position(position)
    same_tokens = ns is not None and ns.token_ids == list(trace.token_ids)
    noise = ns.smallest_level_changing(position) if same_tokens else None
    rows, notes = [], []
    for lt in trace.layers:
        reason = frag.margin_reason(lt)
        if reason is not None:
            notes.append(reason)
            continue
        row = frag.token_margin(trace, lt.layer, position)
        entry = {"layer": lt.layer, "margin": row.margin, "rank": f"{row.rank} of {row.tokens}"}
        entry |= {"chosen": row.chosen, "runner_up": row.runner_up}
        if noise is not None:
            level = noise.get(lt.layer)
            entry["changes at noise"] = "—" if level is None else f"{level:.0%}"
        rows.append(entry)
    table = pd.DataFrame(rows)
    token = code_token(trace.tokens[position])
    if table.empty:
        text = f"No layer has a top-k margin for {token}: " + "; ".join(dict.fromkeys(notes)) + "."
        return View("token_fragility", "How fragile this token's routing is", text, table=pd.DataFrame({"note": notes}))
    tightest = min(rows, key=lambda row: row["margin"])  # the first layer with the smallest margin
    text = (
        f"Token {token} (position {position}) in each layer: its top-k margin and its rank among the "
        f"{plural(trace.num_tokens, 'token')} (1 = the most fragile). Its closest call is in layer "
        f"{tightest['layer']}: margin {num(tightest['margin'])}, where {tightest['runner_up']} would replace one "
        f"of {tightest['chosen']}."
    )
    if noise is not None:
        hit = {layer: level for layer, level in noise.items() if level is not None}
        text += (
            f" Router-input noise up to {ns.levels[-1]:.0%} (measured on the native top-{ns.k} routing) changes its "
            "experts in " + (_noise_layers(hit, len(noise)) if hit else "no layer") + "."
        )
    return View("token_fragility", "How fragile this token's routing is", text, table=table)


EDIT_STYLE = {
    "changed routing": "outline:2px solid #D55E00;background:#FDE2D3",
    "inserted": "background:#F0E442",
    "removed": "text-decoration:line-through;color:#888",
    "same routing": "",
}


def edit_diff(diff: frag.EditDiff) -> View:
    """The edited prompt's tokens in order, removed tokens struck through, inserted ones marked
    yellow, aligned tokens whose experts changed outlined; hover shows both expert sets."""
    spans = []
    for row in diff.table.itertuples():
        title = f"{row.status}; original: {row.experts_original or '—'}; edited: {row.experts_edited or '—'}"
        spans.append(
            f"<span class='moe-tok' title='{html.escape(title)}' style='{EDIT_STYLE[row.status]};"
            f"display:inline-block;padding:1px 2px;margin:1px;border-radius:3px'>{display_token(row.token)}</span>"
        )
    legend = " ".join(
        f"<span style='{style};padding:1px 4px'>{name}</span>" for name, style in EDIT_STYLE.items() if style
    )
    body = f"<div style='line-height:2;overflow-wrap:anywhere'>{''.join(spans)}</div><div style='font-size:0.85em'>{legend}</div>"
    counts = diff.table["status"].value_counts()
    most = max(diff.changed_share_per_layer.items(), key=lambda kv: kv[1])
    text = (
        f"The two prompts share {plural(diff.aligned, 'token')} (aligned in order); "
        f"{plural(int(counts.get('inserted', 0)), 'token')} inserted, {int(counts.get('removed', 0))} removed. "
        f"In layer {diff.layer}, "
        f"{diff.changed} of the {diff.aligned} shared tokens are routed to different experts "
        f"({pct(diff.changed / diff.aligned if diff.aligned else 0.0)}) — outlined. Over all layers the largest "
        f"share is in layer {most[0]} ({pct(most[1])}). Tokens after an edit see a different context, so their "
        "routing can change even though they did not."
    )
    return View("edit_diff", f"Routing of the edited prompt against the original, layer {diff.layer}", text, html=body)
