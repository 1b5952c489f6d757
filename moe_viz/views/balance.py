"""Views of how evenly experts are loaded: expert load bars, the layer x expert load map, the
balance table and metric cards, router confidence per token, co-activation and reuse."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .. import metrics
from ..trace import Trace
from ._display import code_token, pct
from ._plotly import (
    CELL_TEXT_LIMIT,
    DROPPED_COLOR,
    SEQUENTIAL,
    FigureBuilder,
    expert_axis,
    expert_colors,
    f32,
    finish,
    line_trace,
    plotly_trace,
)
from ._view import View

COUNTERFACTUAL_FACTOR = 1.0  # the capacity factor dropless runs are measured against


def _ratio(x: float) -> str:
    """A ratio to a fair share with two significant digits, so 10.7 does not read as 11."""
    return f"{x:.2g}" if x < 10 else f"{x:.1f}"


# ----------------------------------------------------------------------------- one layer's load
def _capacity_sentence(trace: Trace, layer: int, b: metrics.Balance) -> str:
    lt = trace.layer(layer)
    e = b.busiest_expert
    routed_e = int(b.routed[e])
    if b.capacity:
        return (
            f"; with capacity {max(b.capacity)} per expert it dropped {routed_e - int(b.load[e])} of its {routed_e}, "
            f"and the layer dropped {b.dropped} of {b.assignments} ({pct(b.drop_rate)})."
        )
    if b.k >= lt.num_experts:
        return "; every expert processes every token in this mode, so the load is perfectly even."
    check = metrics.capacity_check(lt, COUNTERFACTUAL_FACTOR)
    basis = f"the model's own top-{lt.top_k} routing of these tokens"
    return (
        f". At capacity factor {COUNTERFACTUAL_FACTOR:.1f} (C = {check.capacity} per expert), counted on {basis}, "
        f"expert {e} would drop {int(check.overflow[e])} of {int(check.load[e])}, and the layer {check.dropped} of "
        f"{int(check.load.sum())}."
    )


def expert_load(trace: Trace, layer: int) -> View:
    """Kept assignments per expert (expert colours) with dropped ones stacked on top (hatched),
    the fair-share line (assignments / E) and, under a capacity policy, the capacity line."""
    lt = trace.layer(layer)
    b = metrics.balance(lt)
    E = lt.num_experts
    experts = list(range(E))
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=experts,
            y=b.load.numpy(),
            marker={"color": expert_colors(E), "line": {"width": 0.5, "color": "#333333"}},
            name="kept",
            hovertemplate="expert %{x}: %{y} kept<extra></extra>",
        )
    )
    if b.dropped:
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=experts,
                y=(b.routed - b.load).numpy(),
                name="dropped",
                marker={
                    "color": "rgba(255,255,255,0.6)",
                    "pattern": {"shape": "x", "fgcolor": DROPPED_COLOR},
                    "line": {"width": 1, "color": DROPPED_COLOR},
                },
                hovertemplate="expert %{x}: %{y} dropped<extra></extra>",
            )
        )
    fig.add_hline(
        y=b.fair_share,
        line={"dash": "dash", "color": "#000000"},
        annotation_text=f"fair share {b.fair_share:.1f}",
        annotation_position="top left",
    )
    if b.capacity:
        fig.add_hline(
            y=max(b.capacity),
            line={"dash": "dot", "color": DROPPED_COLOR},
            annotation_text=f"capacity {max(b.capacity)}",
            annotation_position="top right",
        )
    fig.update_layout(
        barmode="stack",
        title={"text": f"Expert load, layer {layer} ({trace.policy}): {b.assignments} assignments"},
        yaxis_title="assignments",
        showlegend=bool(b.dropped),
        plot_bgcolor="#FFFFFF",
    )
    expert_axis(fig, E, "x")

    e = b.busiest_expert
    routed_e = int(b.routed[e])
    ratio = routed_e / b.fair_share if b.fair_share else 0.0
    text = (
        f"Expert {e} took {pct(b.max_share)} of assignments in layer {layer} ({routed_e} of {b.assignments}), "
        f"{_ratio(ratio)}× its fair share of {b.fair_share:.3g} (= {b.assignments} assignments / {E} experts)"
    )
    text += _capacity_sentence(trace, layer, b)
    dead = int((b.routed == 0).sum())
    if dead:
        text += f" {dead} of {E} experts got no token at all."
    return View("expert_load", f"Expert load, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- all layers' load
def _capacity_summary(trace: Trace) -> str:
    """What the capacity limit did over all layers (capacity runs), or what factor 1.0 would do."""
    if any(lt.capacity for lt in trace.layers):
        stats = [metrics.balance(lt) for lt in trace.layers]
        lt0 = trace.layers[0]
        cap = max(lt0.capacity or [0])
        dropped = sum(b.dropped for b in stats)
        total = sum(b.assignments for b in stats)
        full = sum(b.fully_dropped_tokens for b in stats)
        part = sum(b.partially_dropped_tokens for b in stats)
        text = (
            f"Under `{trace.policy}` each expert takes at most C = ⌈factor × T × k / E⌉ = {cap} assignments per layer "
            f"(T = {lt0.num_tokens}, k = {stats[0].k}, E = {lt0.num_experts}). {dropped} of {total} assignments were "
            f"dropped over all layers ({pct(dropped / total if total else 0.0)})"
        )
        if dropped:
            worst = max(stats, key=lambda b: b.dropped)
            text += (
                f", most in layer {worst.layer} ({worst.dropped}). {full} token-layers lost every routed expert "
                f"(only the residual path and any shared expert carry them); {part} lost some "
                "(kept weights are not renormalised)."
            )
        else:
            text += "."
        if any(s > 0 for s in trace.step):
            text += " During generation capacity is recomputed over all tokens so far at every step."
        return text
    checks = [
        (lt.layer, metrics.capacity_check(lt, COUNTERFACTUAL_FACTOR))
        for lt in trace.layers
        if lt.index.shape[1] < lt.num_experts
    ]
    if not checks:
        return "In this mode every expert processes every token: there is no capacity limit and nothing is dropped."
    layer, worst = max(checks, key=lambda c: c[1].dropped)
    return (
        f"This run is dropless: every token reaches its experts. A capacity factor of {COUNTERFACTUAL_FACTOR:.1f} "
        f"(C = {worst.capacity} per expert), applied to the model's own top-{trace.layer(layer).top_k} routing of "
        f"these tokens, would overflow most in layer {layer}: {worst.dropped} of {int(worst.load.sum())} assignments "
        f"({pct(worst.drop_rate)}). This is an estimate from one pass; a real capacity run changes the later layers' "
        "inputs too."
    )


def layer_load(trace: Trace, which: metrics.SetKind = "routed") -> View:
    """Layer x expert load relative to the fair share (1 = fair, 0 = unused); hover gives counts.
    The explanation names the hottest cell of the same map and what capacity does over all layers."""
    loads = metrics.layer_loads(trace, which)  # (L, E)
    L, E = loads.shape
    fair = loads.double().sum(dim=1, keepdim=True) / max(E, 1)  # (L, 1)
    rel = loads.double() / fair.clamp_min(1e-12)  # (L, E)
    text = loads.numpy().astype(str) if L * E <= CELL_TEXT_LIMIT else None
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(rel),
            x=np.arange(E),
            y=[str(i) for i in trace.layer_ids],
            colorscale=SEQUENTIAL,
            zmin=0.0,
            customdata=loads.numpy(),
            text=text,
            texttemplate="%{text}" if text is not None else None,
            colorbar={"title": {"text": "load / fair"}},
            hovertemplate="layer %{y}, expert %{x}<br>%{customdata} assignments<br>%{z:.2f}× fair share<extra></extra>",
        )
    )
    label = {"routed": "routed (kept + dropped)", "kept": "kept", "native": "native top-k"}[which]
    fig.update_layout(title={"text": f"Load per layer and expert, {label}, relative to fair share ({trace.policy})"})
    fig.update_yaxes(title_text="layer", type="category")
    expert_axis(fig, E, "x")

    flat = int(rel.argmax())
    row, e = divmod(flat, E)
    layer = trace.layer_ids[row]
    empty = int((loads == 0).sum())
    explanation = (
        f"Each cell is one expert's {label} load in one layer divided by its fair share (that layer's assignments / "
        f"{E}); 1 is fair. The hottest cell is expert {e} in layer {layer}: {int(loads[row, e])} of "
        f"{int(loads[row].sum())} assignments, {_ratio(float(rel[row, e]))}× its fair share."
    )
    if empty:
        explanation += f" {empty} of the {L * E} cells are 0: experts no token reached in that layer."
    explanation += " " + _capacity_summary(trace)
    return View("layer_load", "Layer × expert load", explanation, figure=finish(fig))


# ----------------------------------------------------------------------------- the balance table and cards
def balance_table(trace: Trace) -> View:
    """Every balance metric per layer plus an 'all' row, with the most and least balanced layers
    and the aux loss against its uniform value named in the text."""
    table = metrics.balance_table(trace)
    shown = table.assign(layer=table["layer"].astype(str))  # the 'all' row: keep the column one type for Arrow
    shown.attrs = dict(table.attrs)
    if not trace.layers:
        return View("balance_table", "All layers", "This trace has no MoE layers.", table=shown)
    rows, all_row = table.iloc[:-1], table.iloc[-1]
    worst = rows.loc[rows["cv"].idxmax()]
    best = rows.loc[rows["cv"].idxmin()]
    k = trace.layers[0].top_k
    text = (
        f"Load CV ranges from {best['cv']:.2f} (layer {best['layer']}) to {worst['cv']:.2f} (layer {worst['layer']}); "
        f"0 would be perfectly balanced. In layer {worst['layer']} the busiest expert gets {worst['max_vio'] + 1:.2g}× "
        f"the mean load (MaxVio {worst['max_vio']:.2f}) and routing behaves like {worst['effective_experts']:.1f} "
        f"equally used experts out of {trace.layer(worst['layer']).num_experts}. The load-balancing loss over all "
        f"layers is {all_row['aux_loss_hf']:.3f} in the transformers convention ({k} under perfectly even routing), "
        f"{all_row['aux_loss_norm']:.3f} normalised (1 under even routing); the mean router z-loss is "
        f"{all_row['z_loss']:.2f}."
    )
    dropped = int(all_row["dropped"])
    if any(lt.capacity for lt in trace.layers) or dropped:
        text += f" {dropped} of {int(all_row['assignments'])} assignments were dropped ({pct(float(all_row['drop_rate']))})."
    return View("balance_table", "All layers", text, table=shown)


@dataclass(frozen=True)
class Card:
    """A metric card: label, the value as shown, and a help text from the metric's definition."""

    label: str
    value: str
    help: str


def metric_cards(trace: Trace, layer: int) -> list[Card]:
    """The Load balance page's cards for ``layer``; each help text is its ``metrics.METRICS`` definition."""
    lt = trace.layer(layer)
    b = metrics.balance(lt)
    E = b.num_experts
    values = {
        "cv": f"{b.cv:.3f}",
        "max_vio": f"{b.max_vio:.3f}",
        "load_entropy_norm": f"{b.load_entropy_norm:.3f}",
        "effective_experts": f"{b.effective_experts:.2f} / {E}",
        "gini": f"{b.gini:.3f}",
        "dead_fraction": f"{b.dead_fraction:.1%}",
        "max_share": f"{b.max_share:.1%}",
        "aux_loss_hf": f"{b.aux_loss_hf:.3f}",
        "aux_loss_norm": f"{b.aux_loss_norm:.3f}",
        "z_loss": f"{b.z_loss:.2f}",
        "dropped": f"{b.dropped} ({b.drop_rate:.1%})",
        "fully_dropped_tokens": f"{b.fully_dropped_tokens}",
    }
    balanced = {"E": str(E), "k": str(lt.top_k), "1/E": f"{1 / E:.1%}", "log E": f"{math.log(E):.2f}"}
    cards = []
    for name, value in values.items():
        m = metrics.METRIC_BY_NAME[name]
        label = m.label
        ideal = balanced.get(m.balanced, m.balanced)
        cards.append(Card(label, value, f"{m.definition}. Perfectly even routing: {ideal}."))
    return cards


# ----------------------------------------------------------------------------- per-token confidence
def router_confidence(trace: Trace, layer: int) -> View:
    """Per token: the router's normalised entropy and its top-k margin (last chosen minus first
    rejected score, at the model's own k); the text names the most fragile decision."""
    lt = trace.layer(layer)
    entropy = metrics.router_entropy(lt)  # (T,)
    margin = metrics.topk_margin(lt)  # (T,)
    T = trace.num_tokens
    pos = np.arange(T)
    fig = FigureBuilder(
        line_trace(pos, entropy, "router entropy (÷ log E)", "#0072B2", "position %{x}: entropy %{y:.3f}")
    )
    fig.add_trace(line_trace(pos, margin, f"top-{lt.top_k} margin", "#E69F00", "position %{x}: margin %{y:.3f}"))
    fig.update_layout(
        title={"text": f"Router confidence per token, layer {layer} ({trace.policy})"},
        xaxis_title="token position",
        legend={"orientation": "h", "y": -0.25},
        plot_bgcolor="#FFFFFF",
    )
    low = int(margin.argmin())
    text = (
        f"Mean normalised router entropy is **{float(entropy.mean()):.2f}** (1 = the router cannot decide, "
        f"0 = it is certain). The top-{lt.top_k} margin (last chosen minus first rejected score at the model's own "
        f"k) averages **{float(margin.mean()):.3f}**; the smallest is token {low} {code_token(trace.tokens[low])}, "
        f"margin **{float(margin[low]):.3f}**."
    )
    return View("router_confidence", f"Router confidence per token, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- co-activation and reuse
def coactivation(trace: Trace, layer: int, which: metrics.SetKind = "routed") -> View:
    """A[a, b] = share of a's tokens that also went to b (rows: a); the independence baseline
    (k-1)/(E-1) is in the title; the diagonal is blank."""
    lt = trace.layer(layer)
    co = metrics.coactivation(lt, which)
    E = lt.num_experts
    cells = None
    if E * E <= CELL_TEXT_LIMIT:
        cells = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in co.matrix.tolist()]
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(co.matrix),
            x=np.arange(E),
            y=np.arange(E),
            colorscale=SEQUENTIAL,
            zmin=0.0,
            zmax=1.0,
            customdata=co.counts.numpy(),
            text=cells,
            texttemplate="%{text}" if cells is not None else None,
            colorbar={"title": {"text": "P(b | a)"}},
            hovertemplate="expert %{y} → %{x}: %{z:.2f} (%{customdata} tokens)<extra></extra>",
        )
    )
    fig.update_layout(
        title={
            "text": f"Co-activation, layer {layer}: share of expert a's tokens also sent to b "
            f"(independent routing: {co.baseline:.2f})"
        }
    )
    expert_axis(fig, E, "x")
    expert_axis(fig, E, "y")
    fig.update_xaxes(title_text="expert b")
    fig.update_yaxes(title_text="expert a", autorange="reversed")

    if co.top_pair is None or co.k < 2:
        text = f"With {co.k} expert per token in layer {layer} there are no pairs of experts to co-activate."
    else:
        a, b, v = co.top_pair
        n_a = int(co.counts[a, a])
        lift = v / co.baseline if co.baseline else float("nan")
        text = (
            f"Row a, column b: of the tokens sent to expert a, the share also sent to b. In layer {layer}, when expert "
            f"{a} is chosen, expert {b} is chosen too {pct(v)} of the time ({int(co.counts[a, b])} of {n_a} tokens), "
            f"{lift:.1f}× the {pct(co.baseline)} expected if the {co.k} experts were picked independently "
            f"((k−1)/(E−1) = {co.k - 1}/{lt.num_experts - 1})."
        )
    return View("coactivation", f"Which experts work together, layer {layer}", text, figure=finish(fig))


def reuse(trace: Trace, layer: int) -> View:
    """Consecutive-token reuse (Mixtral Table 5) against the random-routing baselines, as a table."""
    r = metrics.reuse(trace.layer(layer))
    table = pd.DataFrame(
        {
            "observed": [f"{r.first_choice_same:.1%}", f"{r.sets_intersect:.1%}", f"{r.mean_overlap:.2f}"],
            "random routing": [
                f"{r.first_choice_baseline:.1%}",
                f"{r.intersect_baseline:.1%}",
                f"{r.overlap_baseline:.2f}",
            ],
        },
        index=["same first choice", "sets share an expert", "mean overlap |S_t ∩ S_t+1|"],
    )
    if not r.pairs:
        text = "Reuse needs at least two tokens."
    else:
        text = (
            f"In layer {layer}, consecutive tokens keep the same first-choice expert {pct(r.first_choice_same)} of "
            f"the time (random: {pct(r.first_choice_baseline)}), share at least one of their {r.k} experts "
            f"{pct(r.sets_intersect)} of the time (random: {pct(r.intersect_baseline)}) and share "
            f"{r.mean_overlap:.2f} experts on average (random: {r.overlap_baseline:.2f}), over {r.pairs} pairs."
        )
    return View("reuse", f"Do consecutive tokens reuse experts? Layer {layer}", text, table=table)


__all__ = [
    "COUNTERFACTUAL_FACTOR",
    "Card",
    "balance_table",
    "coactivation",
    "expert_load",
    "layer_load",
    "metric_cards",
    "reuse",
    "router_confidence",
]
