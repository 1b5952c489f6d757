"""Views of how evenly experts are loaded: expert load bars, the layer x expert load map, the
balance table and metric cards, router confidence per token, co-activation and reuse."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from .. import metrics
from ..trace import Trace
from ._display import code_token, pct, plural, times
from ._experts import (
    MANY_EXPERTS,
    NEUTRAL,
    SHOWN_EXPERTS,
    busiest_first,
    category_axis,
    chart_height,
    expert_focus,
    fold,
)
from ._plotly import (
    CELL_TEXT_LIMIT,
    DROPPED_COLOR,
    SEQUENTIAL,
    FigureBuilder,
    expert_axis,
    f32,
    finish,
    line_trace,
    plotly_trace,
)
from ._view import View
from .routing import fragility_sentence

COUNTERFACTUAL_FACTOR = 1.0  # the capacity factor dropless runs are measured against


# ----------------------------------------------------------------------------- one layer's load
def _residual_clause(trace: Trace) -> str:
    """Who carries a token whose every routed expert was dropped, on this model."""
    if any(lt.shared_expert for lt in trace.layers):
        return "the residual path and the shared expert still carry them"
    return "only the residual path carries them"


def _capacity_values(capacity: list[int]) -> str:
    """'C = 6' for one forward; 'C grows from 3 to 5 over the 12 decode steps' for a generation."""
    if len(set(capacity)) == 1:
        return f"C = {capacity[0]}"
    return f"C grows from {capacity[0]} to {capacity[-1]} over the {len(capacity)} forward steps"


def _counterfactual(trace: Trace, layer: int) -> tuple[metrics.CapacityCheck, str]:
    """What factor 1.0 would drop on this layer, and how exact that estimate is."""
    lt = trace.layer(layer)
    check = metrics.capacity_check(lt, COUNTERFACTUAL_FACTOR)
    first = layer == trace.layer_ids[0]
    basis = f"counted on the model's own top-{lt.top_k} routing of these tokens"
    exact = (
        "exact here: the first MoE layer sees the same inputs"
        if first
        else "an estimate: a real capacity run also changes this layer's inputs"
    )
    return check, f"{basis} ({exact})"


def _expert_load_text(trace: Trace, layer: int, b: metrics.Balance) -> str:
    lt = trace.layer(layer)
    E = lt.num_experts
    if lt.every_expert_runs:
        return (
            f"Every expert processes every one of the {plural(b.num_tokens, 'token')} in this run, so each of the "
            f"{plural(E, 'expert')} carries exactly {b.num_tokens} assignments: the load is perfectly even."
        )
    e = int(b.routed.argmax())  # the tallest bar: most asked for (kept + dropped)
    routed_e = int(b.routed[e])
    text = (
        f"The router sent most assignments in layer {layer} to expert {e}: {routed_e} of {b.assignments} "
        f"({pct(routed_e / b.assignments if b.assignments else 0.0)}), {times(routed_e / b.fair_share)} its fair "
        f"share of {b.fair_share:.3g} (= {b.assignments} assignments / {E} experts)"
    )
    if b.capacity:
        kept_e = int(b.load[e])
        per_step = len(b.capacity) > 1
        text += (
            f". With capacity {_capacity_values(b.capacity)} per expert it processed {kept_e} and dropped "
            f"{routed_e - kept_e}; the layer dropped {b.dropped} of {b.assignments} ({pct(b.drop_rate)})."
        )
        if per_step:
            text += " The limit applies per forward step and the bars add up all steps, so an expert can keep more than one step's C."
    else:
        check, basis = _counterfactual(trace, layer)
        text += (
            f". At capacity factor {COUNTERFACTUAL_FACTOR:.1f} (C = {check.capacity} per expert), {basis}, expert "
            f"{e} would drop {int(check.overflow[e])} of {int(check.load[e])}, and the layer {check.dropped} of "
            f"{int(check.load.sum())}."
        )
    dead = int((b.load == 0).sum())
    if dead:
        text += f" {dead} of {E} experts processed no token"
        if b.assignments < E:
            text += f" (with {plural(b.assignments, 'assignment')} at most {b.assignments} can be used)"
        text += "."
    return text


def expert_load(trace: Trace, layer: int) -> View:
    """Kept assignments per expert (expert colours) with dropped ones stacked on top (hatched),
    the fair-share line (assignments / E) and, under a capacity policy, the capacity line."""
    lt = trace.layer(layer)
    b = metrics.balance(lt)
    E = lt.num_experts
    focus = expert_focus(lt)
    experts: list = list(range(E))
    kept, dropped = b.load.double(), (b.routed - b.load).double()  # (E,)
    colors = focus.colors()
    if focus.folded:  # many experts: the busiest by load, then the others' mean as one bar
        kept, experts = fold(kept, focus, "mean")
        dropped, _ = fold(dropped, focus, "mean")
        experts[-1] += " (mean)"
        colors = [focus.color(e) for e in focus.shown] + [NEUTRAL]
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=experts,
            y=kept.numpy(),
            marker={"color": colors, "line": {"width": 0.5, "color": "#333333"}},
            name="kept",
            hovertemplate=("%{x}" if focus.folded else "expert %{x}") + ": %{y:.4g} kept<extra></extra>",
        )
    )
    if b.dropped:
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=experts,
                y=dropped.numpy(),
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
    if b.capacity and len(set(b.capacity)) == 1:  # a generation has one C per step: no single line is true
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
    if focus.folded:
        category_axis(fig, experts, focus.axis_title(), "x")
    else:
        expert_axis(fig, E, "x")

    text = _expert_load_text(trace, layer, b)
    if focus.folded:
        text += (
            f" With {E} experts the bars are the {len(focus.shown)} busiest, busiest first, and the mean of the other "
            f"{len(focus.folded)}; hover a bar for its exact count."
        )
    return View("expert_load", f"Expert load, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- all layers' load
def _capacity_summary(trace: Trace) -> str:
    """What the capacity limit did over all layers (capacity runs), or what factor 1.0 would do."""
    if any(lt.capacity for lt in trace.layers):
        stats = [metrics.balance(lt) for lt in trace.layers]
        lt0 = trace.layers[0]
        dropped = sum(b.dropped for b in stats)
        total = sum(b.assignments for b in stats)
        full = sum(b.fully_dropped_tokens for b in stats)
        part = sum(b.partially_dropped_tokens for b in stats)
        text = (
            f"Under `{trace.policy}` each expert takes at most C = ⌈factor × T × k / E⌉ assignments per layer "
            f"({_capacity_values(lt0.capacity or [0])}; k = {stats[0].k}, E = {lt0.num_experts}). {dropped} of "
            f"{total} assignments were dropped over all layers ({pct(dropped / total if total else 0.0)})"
        )
        if dropped:
            worst = max(stats, key=lambda b: b.dropped)
            text += (
                f", most in layer {worst.layer} ({worst.dropped}). {plural(full, 'token-layer')} lost every routed "
                f"expert ({_residual_clause(trace)}); {part} lost some and kept the rest (kept weights are not "
                "renormalised)."
            )
        else:
            text += "."
        if any(s > 0 for s in trace.step):
            text += " During generation capacity is recomputed over all tokens so far at every step."
        return text
    checks = [(lt.layer, *_counterfactual(trace, lt.layer)) for lt in trace.layers if not lt.every_expert_runs]
    if not checks:
        return "Every expert processes every token in this run: there is no capacity limit and nothing is dropped."
    layer, worst, basis = max(checks, key=lambda c: c[1].dropped)
    return (
        f"This run is dropless: every token reaches its experts. A capacity factor of {COUNTERFACTUAL_FACTOR:.1f} "
        f"(C = {worst.capacity} per expert), {basis}, would overflow most in layer {layer}: {worst.dropped} of "
        f"{int(worst.load.sum())} assignments ({pct(worst.drop_rate)})."
    )


def layer_load(trace: Trace, which: metrics.SetKind = "kept") -> View:
    """Layer x expert load relative to the fair share (1 = fair, 0 = unused); hover gives counts.
    The explanation names the hottest cell of the same map and what capacity does over all layers."""
    loads = metrics.layer_loads(trace, which)  # (L, E)
    label = {"routed": "routed (kept + dropped)", "kept": "processed (kept)", "native": "native top-k"}[which]
    fig, explanation = load_map(loads, trace.layer_ids, label, trace.policy)
    explanation += " " + _capacity_summary(trace)
    return View("layer_load", "Layer × expert load", explanation, figure=finish(fig))


def load_map(loads: torch.Tensor, layer_ids: list[int], label: str, policy: str) -> tuple[FigureBuilder, str]:
    """The layer x expert map of ``loads`` (L, E) relative to each layer's fair share, and the
    sentence naming its hottest cell (a trace's loads, or a count import's)."""
    L, E = loads.shape
    fair = loads.double().sum(dim=1, keepdim=True) / max(E, 1)  # (L, 1)
    rel = loads.double() / fair.clamp_min(1e-12)  # (L, E)
    shown_rel, shown_loads, columns = rel, loads, np.arange(E)
    busiest: list[int] = []
    if E > MANY_EXPERTS:  # many experts: the busiest over all layers, then the others' mean
        total = loads.double().sum(dim=0)  # (E,)
        busiest = busiest_first(total, SHOWN_EXPERTS)
        rest = [e for e in range(E) if e not in set(busiest)]
        shown_rel = torch.cat([rel[:, busiest], rel[:, rest].mean(dim=1, keepdim=True)], dim=1)  # (L, S + 1)
        shown_loads = torch.cat([loads[:, busiest].double(), loads[:, rest].double().mean(dim=1, keepdim=True)], dim=1)
        columns = [f"e{e}" for e in busiest] + [f"other {len(rest)} (mean)"]
    many_layers = L > 32
    text = shown_loads.numpy().astype(str) if shown_loads.numel() <= CELL_TEXT_LIMIT else None
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(shown_rel),
            x=columns,
            y=list(layer_ids) if many_layers else [str(i) for i in layer_ids],
            colorscale=SEQUENTIAL,
            zmin=0.0,
            customdata=shown_loads.numpy(),
            text=text,
            texttemplate="%{text}" if text is not None else None,
            colorbar={"title": {"text": "load / fair"}},
            hovertemplate=("layer %{y}, " + ("%{x}" if busiest else "expert %{x}"))
            + "<br>%{customdata:.4g} assignments<br>%{z:.2f}× fair share<extra></extra>",
        )
    )
    fig.update_layout(title={"text": f"Load per layer and expert, {label}, relative to fair share ({policy})"})
    if many_layers:  # numbered layers: plotly thins the ticks; every row keeps its hover
        fig.update_yaxes(title_text="layer", autorange="reversed")
    else:
        fig.update_yaxes(title_text="layer", type="category")
    if busiest:
        category_axis(fig, list(columns), f"expert: the {len(busiest)} busiest over all layers, then the rest", "x")
    else:
        expert_axis(fig, E, "x")
    if many_layers or busiest:
        fig.update_layout(height=chart_height(L))

    flat = int(rel.argmax())
    row, e = divmod(flat, E)
    layer = layer_ids[row]
    empty = int((loads == 0).sum())
    explanation = (
        f"Each cell is one expert's {label} load in one layer divided by its fair share (that layer's load / "
        f"{E}); 1 is fair."
    )
    if bool((rel - rel[0, 0]).abs().max() < 1e-9):
        explanation += " Every cell is at its fair share: the load is perfectly even."
    else:
        explanation += (
            f" The hottest cell is expert {e} in layer {layer}: {int(loads[row, e])} of {int(loads[row].sum())} "
            f"assignments, {times(float(rel[row, e]))} its fair share."
        )
    if empty:
        explanation += f" {empty} of the {L * E} cells are 0: experts that processed no token in that layer."
    if busiest:
        explanation += (
            f" With {E} experts the columns are the {len(busiest)} busiest over all layers and the mean of the other "
            f"{E - len(busiest)}; the hottest cell above is searched over all {E}."
        )
    return fig, explanation


# ----------------------------------------------------------------------------- the balance table and cards
def balance_table(trace: Trace) -> View:
    """Every balance metric per layer plus an 'all' row, with the most and least balanced layers
    and the aux loss against its uniform value named in the text."""
    records = metrics.balance_records(trace)  # the table's rows as plain values, cheaper to read than the frame
    # the table as shown: layer ids as text, so that the 'all' row gives the column one type for Arrow
    shown = metrics.balance_frame(trace, [{**row, "layer": str(row["layer"])} for row in records])
    if not trace.layers:
        return View("balance_table", "All layers", "This trace has no MoE layers.", table=shown)
    rows, all_row = records[:-1], records[-1]
    worst = max(rows, key=lambda row: row["cv"])  # the first layer with the largest CV, as idxmax
    best = min(rows, key=lambda row: row["cv"])
    k = trace.layers[0].top_k
    text = (
        f"Imbalance is measured on the load each expert processed under `{trace.policy}`. Load CV ranges from "
        f"{best['cv']:.2f} (layer {best['layer']}) to {worst['cv']:.2f} (layer {worst['layer']}); 0 would be "
        f"perfectly balanced."
    )
    if worst["cv"] > 0:
        text += (
            f" In layer {worst['layer']} the busiest expert processes {times(worst['max_vio'] + 1)} the mean load "
            f"(MaxVio {worst['max_vio']:.2f}) and the load is spread like {worst['effective_experts']:.1f} equally "
            f"used experts out of {trace.layer(worst['layer']).num_experts}."
        )
    if trace.scores_recorded:
        text += (
            f" The load-balancing loss, computed as in training on the router's own top-{k} whatever the mode, is "
            f"{all_row['aux_loss_hf']:.3f} in the transformers convention ({k} under perfectly even routing; lower "
            f"values are possible) and {all_row['aux_loss_norm']:.3f} normalised; the mean router z-loss is "
            f"{all_row['z_loss']:.2f}."
        )
    else:  # an engine import: ids only, and both losses need the router's logits
        shown = shown.drop(columns=list(SCORE_COLUMNS))
        text += " The aux loss and z-loss need the router's logits, which the engine did not record."
    dropped = int(all_row["dropped"])
    if any(lt.capacity for lt in trace.layers) or dropped:
        text += f" {dropped} of {int(all_row['assignments'])} assignments were dropped ({pct(float(all_row['drop_rate']))})."
    title = f"All layers (imbalance on the load processed under {trace.policy}; aux loss on the native top-{k})"
    if not trace.scores_recorded:
        title = f"All layers (imbalance on the load the engine recorded, {trace.policy})"
    return View("balance_table", title, text, table=shown)


# Metrics computed from the router's logits: absent from an engine import of expert ids.
SCORE_COLUMNS = ("aux_loss_hf", "aux_loss_norm", "z_loss")


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
        # compact at hundreds of experts, so a card of a six-column row is not cut
        "effective_experts": f"{b.effective_experts:.2f} / {E}"
        if E <= MANY_EXPERTS
        else f"{b.effective_experts:.0f}/{E}",
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
        if name in SCORE_COLUMNS and not lt.scores_recorded:  # an engine import: no logits, no losses
            continue
        m = metrics.METRIC_BY_NAME[name]
        label = m.label
        ideal = balanced.get(m.balanced, m.balanced)
        cards.append(Card(label, value, f"{m.definition}. Perfectly even routing: {ideal}."))
    return cards


# ----------------------------------------------------------------------------- per-token confidence
def router_confidence(trace: Trace, layer: int) -> View:
    """Per token: the router's normalised entropy and, where the scores alone make the choice, the
    top-k' margin at this run's k (last chosen minus first left-out score)."""
    lt = trace.layer(layer)
    entropy = metrics.router_entropy(lt)  # (T,)
    T = trace.num_tokens
    pos = np.arange(T)
    k = lt.applied_k
    show_margin = not lt.every_expert_runs and lt.scores_decide
    fig = FigureBuilder(
        line_trace(pos, entropy, "router entropy (÷ log E)", "#0072B2", "position %{x}: entropy %{y:.3f}")
    )
    margin = metrics.topk_margin(lt, k) if show_margin else None  # (T,)
    if margin is not None:
        fig.add_trace(line_trace(pos, margin, f"top-{k} margin", "#E69F00", "position %{x}: margin %{y:.3f}"))
    fig.update_layout(
        title={"text": f"Router confidence per token, layer {layer} ({trace.policy})"},
        xaxis_title="token position",
        legend={"orientation": "h", "y": -0.25},
        plot_bgcolor="#FFFFFF",
    )
    renorm = ", scores renormalised to sum to 1" if lt.score_name == "score" else ""
    text = (
        f"Mean normalised router entropy is **{float(entropy.mean()):.2f}** (1 = the router cannot decide, "
        f"0 = it is certain{renorm})."
    )
    if margin is not None:
        low = int(margin.argmin())
        text += (
            f" The top-{k} margin (last chosen minus first left-out {lt.score_name}, at this run's k) averages "
            f"**{float(margin.mean()):.3f}**; the smallest is token {low} {code_token(trace.tokens[low])}, margin "
            f"**{float(margin[low]):.3f}**: the choice most easily swapped."
        )
    else:
        text += " " + fragility_sentence(lt)
    return View("router_confidence", f"Router confidence per token, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- co-activation and reuse
def coactivation(trace: Trace, layer: int, which: metrics.SetKind = "routed") -> View:
    """A[a, b] = share of a's tokens that also went to b (rows: a); the independence baseline
    (k-1)/(E-1) is in the title; the diagonal is blank."""
    lt = trace.layer(layer)
    co = metrics.coactivation(lt, which)
    E = lt.num_experts
    focus = expert_focus(lt)
    matrix, counts, axis = co.matrix, co.counts, np.arange(E)
    if focus.folded:  # many experts: the busiest experts' pairs, in load order
        shown = list(focus.shown)
        matrix, counts = co.matrix[shown][:, shown], co.counts[shown][:, shown]
        axis = [focus.label(e) for e in shown]
    cells = None
    if matrix.numel() <= CELL_TEXT_LIMIT:
        cells = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in matrix.tolist()]
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(matrix),
            x=axis,
            y=axis,
            colorscale=SEQUENTIAL,
            zmin=0.0,
            zmax=1.0,
            customdata=counts.numpy(),
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
    if focus.folded:
        category_axis(fig, axis, f"expert b (the {len(axis)} busiest)", "x")
        category_axis(fig, axis, f"expert a (the {len(axis)} busiest, by load)", "y", reverse=True)
        fig.update_layout(height=chart_height(len(axis), extra=220))
    else:
        expert_axis(fig, E, "x")
        expert_axis(fig, E, "y")
        fig.update_xaxes(title_text="expert b")
        fig.update_yaxes(title_text="expert a", autorange="reversed")

    if co.top_pair is None or co.k < 2:
        text = f"With {plural(co.k, 'expert')} per token in layer {layer} there are no pairs of experts to co-activate."
    elif co.k >= E:
        text = f"Every expert runs for every token in layer {layer}, so every pair of experts always works together."
    else:
        a, b, v = co.top_pair
        n_a = int(co.counts[a, a])
        lift = v / co.baseline if co.baseline else float("nan")
        text = (
            f"Row a, column b: of the tokens sent to expert a, the share also sent to b. In layer {layer}, when expert "
            f"{a} is chosen, expert {b} is chosen too {pct(v)} of the time ({int(co.counts[a, b])} of "
            f"{plural(n_a, 'token')}), {times(lift)} the {pct(co.baseline)} expected if the {co.k} experts were "
            f"picked independently ((k−1)/(E−1) = {co.k - 1}/{E - 1})"
        )
        if lt.group_limited:
            text += (
                "; this router picks experts inside each token's best groups, so experts of one group co-occur more "
                "often than this independence baseline assumes"
            )
        if co.min_tokens > 1:
            text += f" (experts a with fewer than {co.min_tokens} tokens are not cited: too few to mean much)"
        text += "."
        if focus.folded:
            text += (
                f" With {E} experts the map shows the pairs among the {len(focus.shown)} busiest, busiest first; "
                "the sentence above searches all of them."
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
