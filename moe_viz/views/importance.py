"""Views of causal expert importance on one prompt: the loss change when each expert is ablated,
per layer and expert, and how far load predicts it."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from ..importance import Importance
from ._display import num, pct
from ._experts import MANY_EXPERTS, SHOWN_EXPERTS, busiest_first, chart_height
from ._plotly import FigureBuilder, expert_axis, expert_colors, finish, plotly_trace
from ._view import View

ONE_PROMPT = (
    "This is one prompt: importance on a corpus can differ (corpus runs extend it), and no routing statistic "
    "observed without intervening is a reliable stand-in for it."
)


def _mode_words(mode: str) -> str:
    return (
        "its logit masked, so the next-best expert takes its slot"
        if mode == "reroute"
        else "its weight set to 0 (selection unchanged, not renormalised)"
    )


def importance_heatmap(imp: Importance) -> View:
    """Heatmap layer x expert of the loss change when that expert is ablated (diverging: red =
    the prompt does worse without it); the text cites the most important expert and its load."""
    t = imp.table
    layers = sorted(t["layer"].unique().tolist())
    E = int(t["expert"].max()) + 1
    z = np.full((E, len(layers)), np.nan)
    for row in t.itertuples():
        z[row.expert, layers.index(row.layer)] = row.delta_loss
    bound = float(np.nanmax(np.abs(z))) or 1e-9
    rows: list = list(range(E))
    if E > MANY_EXPERTS:  # many experts: those with the largest effect in any layer
        strength = np.nan_to_num(np.nanmax(np.abs(z), axis=1), nan=-1.0)  # (E,)
        rows = busiest_first(strength, SHOWN_EXPERTS)
        z = z[rows]
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=z,
            x=[str(layer) for layer in layers],
            y=[f"e{e}" for e in rows] if E > MANY_EXPERTS else np.arange(E),
            colorscale="RdBu_r",
            zmin=-bound,
            zmax=bound,
            colorbar={"title": {"text": "Δ loss (nats)"}},
            hovertemplate="layer %{x}, expert %{y}<br>Δ loss %{z:+.4f} nats<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"Loss change when one expert is ablated ({imp.mode}), per layer and expert"},
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        plot_bgcolor="#FFFFFF",
    )
    if E > MANY_EXPERTS:
        fig.update_yaxes(
            title_text=f"expert (the {len(rows)} with the largest effect)", type="category", autorange="reversed"
        )
        fig.update_layout(height=chart_height(len(rows)))
    else:
        expert_axis(fig, E)
    best = t.loc[t["importance"].idxmax()]
    helps = t.loc[t["delta_loss"].idxmin()]
    text = (
        f"Each cell is the change in the prompt's mean next-token loss (base {num(imp.base_loss)} nats) when that "
        f"expert is ablated in that layer — {_mode_words(imp.mode)} — and everything else runs as the model does. "
        f"The largest effect is expert {int(best.expert)} in layer {int(best.layer)}: Δ loss "
        f"{best.delta_loss:+.4f} nats ("
        + ("the loss rises without it" if best.delta_loss >= 0 else "the prompt does better without it")
        + f"), while it carries {pct(best.load_share)} of that layer's load."
    )
    same = (int(helps.expert), int(helps.layer)) == (int(best.expert), int(best.layer))
    if helps.delta_loss < 0 and not same:
        text += (
            f" Blue cells are experts the prompt does better without; the strongest is expert {int(helps.expert)} "
            f"in layer {int(helps.layer)} ({helps.delta_loss:+.4f})."
        )
    return View("importance_heatmap", "Causal importance per expert", text + " " + ONE_PROMPT, figure=finish(fig))


def importance_vs_load(imp: Importance, layer: int) -> View:
    """Scatter per expert of one layer: load share (x) against importance |Δ loss| (y), with the
    Spearman rank correlation between them."""
    t = imp.table[imp.table["layer"] == layer]
    if t.empty:
        raise ValueError(f"layer must be one of the ablated layers {sorted(imp.rank_correlation)}; got {layer}")
    E = len(t)
    colors = expert_colors(E)
    fig = FigureBuilder(
        plotly_trace(
            go.Scatter,
            x=t["load_share"].to_numpy(),
            y=t["importance"].to_numpy(),
            mode="markers+text" if E <= 32 else "markers",
            text=[f"e{e}" for e in t["expert"]],
            textposition="top center",
            marker={"size": 11, "color": [colors[e] for e in t["expert"]], "line": {"width": 1, "color": "#000"}},
            customdata=t["delta_loss"].to_numpy(),
            hovertemplate="expert %{text}<br>load %{x:.1%}<br>Δ loss %{customdata:+.4f}<extra></extra>",
        )
    )
    rho = imp.rank_correlation.get(layer, math.nan)
    fig.update_layout(
        title={"text": f"Importance against load, layer {layer}: Spearman ρ = {rho:.2f}"},
        xaxis={"title": {"text": "load share (native assignments)"}, "tickformat": ".0%"},
        yaxis={"title": {"text": "importance |Δ loss| (nats)"}},
        plot_bgcolor="#FFFFFF",
    )
    busiest = t.loc[t["load_share"].idxmax()]
    key = t.loc[t["importance"].idxmax()]
    rank_of_busiest = int((t["importance"] > busiest.importance).sum()) + 1
    if math.isnan(rho):
        verdict = "The rank correlation is undefined here (one of the two is the same for every expert)."
    else:
        strength = "strongly" if abs(rho) >= 0.7 else "weakly" if abs(rho) >= 0.3 else "hardly"
        verdict = f"Load and importance are {strength} rank-correlated (Spearman ρ = {rho:.2f} over {E} experts)."
    text = (
        f"Each dot is an expert of layer {layer}: how much of the layer's load it carries against how much the "
        f"loss moves without it. {verdict} The busiest expert, e{int(busiest.expert)} "
        f"({pct(busiest.load_share)} of the load), ranks {rank_of_busiest} of {E} by importance; the most "
        f"important, e{int(key.expert)} (|Δ loss| {num(key.importance)}), carries {pct(key.load_share)}. " + ONE_PROMPT
    )
    return View("importance_vs_load", f"Importance against load, layer {layer}", text, figure=finish(fig))
