"""Views of corpus statistics: each chart with its interval and a sentence citing the numbers.

Every view takes a ``CorpusReport`` (``moe_viz.corpus.report``) and, where the chart is per layer,
a decoder-layer id. Intervals are the report's bootstrap percentile intervals over groups of
documents; the explanations say so and say how many documents the run held.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..corpus.aggregates import CorpusAggregates
from ..corpus.report import CorpusReport
from ..corpus.stats import Estimate
from ._display import num, pct, per_layer_values, times, visible
from ._experts import MANY_EXPERTS, SHOWN_EXPERTS, busiest_first, chart_height
from ._plotly import OKABE_ITO, TOL_MUTED, FigureBuilder, expert_axis, expert_colors, finish, plotly_trace
from ._view import View

TokenText = Callable[[int], str]


DOMAIN_PALETTE = [c for c in OKABE_ITO if c not in ("#F0E442", "#000000")] + TOL_MUTED  # no faint yellow, no black


def domain_colors(n: int) -> list[str]:
    """One colour per domain: Okabe-Ito without its yellow and black (too faint, or read as
    redaction, on thin bars), then Tol's muted palette."""
    return [DOMAIN_PALETTE[i % len(DOMAIN_PALETTE)] for i in range(n)]


def pct_ci(value: float, low: float, high: float) -> str:
    """'42.0% (39.5–44.9)': a share and its interval, one decimal, compact for tables."""
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}% ({100 * low:.1f}–{100 * high:.1f})"


def around(middle: float, top: float) -> list[list]:
    """A colour scale from 0 to ``top``: blue below ``middle`` (a baseline), neutral at it, red above."""
    at = min(max(middle / top, 0.0), 1.0) if top > 0 else 0.5
    return [[0.0, "#2166AC"], [at, "#F2F2F2"], [1.0, "#B2182B"]]


def reference_line(E: int, y: float, name: str) -> dict:
    """A dashed horizontal line across the expert axis, named in the legend (a label on the
    line itself hides behind the bars)."""
    return plotly_trace(
        go.Scatter,
        x=[-0.5, E - 0.5],
        y=[y, y],
        mode="lines",
        name=name,
        line={"dash": "dash", "color": "#444", "width": 1.5},
        hoverinfo="skip",
    )


# Dense bar charts: the legend in rows under the plot, so the plot keeps the column's width.
TOP_LEGEND = {"orientation": "h", "yanchor": "top", "y": -0.22, "x": 0, "title": {"text": ""}}


def ci_text(value: float, low: float, high: float, fmt: Callable[[float], str] = num) -> str:
    """'0.412 (95% CI 0.380–0.447)' style, with the given number format."""
    if not math.isfinite(value):
        return "n/a"
    return f"{fmt(value)} (CI {fmt(low)}–{fmt(high)})"


def best_index(x: np.ndarray, lowest: bool = False) -> tuple[int, ...] | None:
    """Index of the largest (or smallest) finite value of ``x``; None when none is finite."""
    x = np.asarray(x, dtype=float)
    if not np.isfinite(x).any():
        return None
    flat = np.nanargmin(x) if lowest else np.nanargmax(x)
    return tuple(int(i) for i in np.unravel_index(flat, x.shape))


NO_DATA = "This run holds too little text for this statistic; a longer corpus gives it its numbers."


def _layer_index(report: CorpusReport, layer: int) -> int:
    layers = list(report.domain.layers)
    if layer not in layers:
        raise ValueError(f"layer must be one of the MoE layers {layers}; got {layer!r}")
    return layers.index(layer)


def _error(est: Estimate, *index: int | slice) -> dict:
    v, lo, hi = est.value[index], est.low[index], est.high[index]
    return {"type": "data", "symmetric": False, "array": np.nan_to_num(hi - v), "arrayminus": np.nan_to_num(v - lo)}


THIN_DOCUMENTS = 5  # a domain with fewer documents gets intervals that understate its uncertainty


def intervals_note(report: CorpusReport) -> str:
    unit = report.meta.get("unit", "document")  # an engine's count import resamples its recorded steps
    note = (
        f"Intervals: {report.level:.0%} bootstrap percentile intervals from {report.replicates} resamples of the "
        f"run's {report.documents} {unit}s (whole {unit}s, in groups; seed {report.seed})."
    )
    thin = [d for d, n in report.documents_per_domain.items() if n < THIN_DOCUMENTS]
    if report.documents < 2 * THIN_DOCUMENTS:
        note += f" **With {report.documents} {unit}s these intervals are rough; take them as a lower bound.**"
    elif thin:
        note += (
            f" **Fewer than {THIN_DOCUMENTS} documents in {', '.join(thin)}: their intervals understate the "
            "uncertainty.**"
        )
    return note


# ------------------------------------------------------------------ domains
GROUPED_BARS_MAX = 16  # experts up to which a domain x expert chart is grouped bars


def _domain_expert_heatmap(
    est: Estimate, li: int, domains: list[str], reference: tuple[float, str], title: str, hover: str
) -> FigureBuilder:
    z = est.value[li] * 100  # (D, E) percent
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 1.0
    custom = np.dstack([est.low[li] * 100, est.high[li] * 100])  # (D, E, 2)
    E = z.shape[1]
    columns: list = list(range(E))
    if E > SHOWN_EXPERTS:  # hundreds of experts: the ones whose share depends most on the domain
        spread = np.nan_to_num(np.nanmax(np.abs(z - reference[0] * 100), axis=0), nan=-1.0)  # (E,)
        keep = busiest_first(spread, SHOWN_EXPERTS)
        z, custom = z[:, keep], custom[:, keep]
        columns = [f"e{e}" for e in keep]
        title += f"; the {len(keep)} experts of {E} furthest from it"
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=z,
            x=columns,
            y=domains,
            customdata=custom,
            colorscale=around(reference[0] * 100, top),
            zmin=0,
            zmax=top,
            colorbar={"title": {"text": "%"}},
            hovertemplate=f"%{{y}}, expert %{{x}}: %{{z:.1f}}% {hover} "
            "(CI %{customdata[0]:.1f}–%{customdata[1]:.1f})<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"{title} (neutral colour: {reference[1]})"},
        yaxis={"type": "category", "autorange": "reversed"},
        plot_bgcolor="#FFFFFF",
    )
    if E > SHOWN_EXPERTS:
        fig.update_xaxes(title_text="expert (furthest from the neutral colour first)", type="category")
    else:
        expert_axis(fig, E, "x")
    return fig


def domain_expert_bars(
    est: Estimate, li: int, domains: list[str], reference: tuple[float, str], title: str, y_title: str, hover: str
) -> FigureBuilder:
    """Grouped bars: per expert, one bar per domain of ``est[li, domain, expert]`` with its interval,
    a named reference line, the legend under the plot. Above GROUPED_BARS_MAX experts the bars would
    be slivers: a domain x expert heatmap instead, coloured around the reference, intervals on hover."""
    E = est.value.shape[-1]
    if E > GROUPED_BARS_MAX:
        return _domain_expert_heatmap(est, li, domains, reference, title, hover)
    colors = domain_colors(len(domains))
    fig = FigureBuilder()
    for j, name in enumerate(domains):
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=list(range(E)),
                y=est.value[li, j],
                name=name,
                marker={"color": colors[j]},
                error_y=_error(est, li, j),
                hovertemplate=f"{name}, expert %{{x}}: %{{y:.1%}} {hover}<extra></extra>",
            )
        )
    fig.add_trace(reference_line(E, *reference))
    fig.update_layout(
        title={"text": title},
        barmode="group",
        bargap=0.25,
        yaxis={"title": {"text": y_title}, "tickformat": ".0%"},
        legend=TOP_LEGEND,
        margin={"b": 140},
        plot_bgcolor="#FFFFFF",
    )
    expert_axis(fig, E, "x")
    return fig


def domain_shares(report: CorpusReport, layer: int) -> View:
    """Grouped bars per expert: each domain's share of its assignments that went to the expert,
    with intervals and the fair share 1/E (Mixtral Fig. 7 style)."""
    li = _layer_index(report, layer)
    d = report.domain
    E = d.share.value.shape[-1]
    fig = domain_expert_bars(
        d.share,
        li,
        d.domains,
        (d.fair_share, f"balanced 1/{E} = {pct(d.fair_share)}"),
        f"Share of each domain's assignments per expert, layer {layer}",
        "share of the domain's assignments",
        "of its assignments",
    )
    top = best_index(d.lift.value[li])
    if top is None:
        return View("corpus_domain_shares", f"Expert share per domain (layer {layer})", NO_DATA, figure=finish(fig))
    j, e = top
    mi = d.mi_bits.at(li)
    heatmap = E > GROUPED_BARS_MAX  # the same choice domain_expert_bars makes
    mark, marks = ("cell", "row") if heatmap else ("bar", "bars")
    balanced = "the neutral colour," if heatmap else "the dashed line"
    text = (
        f"Each {mark} is the share of a domain's expert assignments in layer {layer} that went to that expert "
        f"(c_de / Σ_e c_de). A balanced layer puts every expert at {balanced} 1/{E} = {pct(1 / E)}; routing "
        f"that ignored the domain would give every domain the same {marks} (each expert's share over all domains). "
        f"The domain that most over-uses an expert is **{d.domains[j]} → expert {e}**: "
        f"{ci_text(*d.share.at(li, j, e), pct)} of that domain's assignments, "
        f"{times(float(d.lift.value[li, j, e]))} the expert's share over all domains "
        f"({times(float(d.ratio.value[li, j, e]))} the balanced 1/{E}). "
        f"Mutual information between domain and expert in this layer: {ci_text(*mi)} bits; shuffling the documents' "
        f"domains gives at most {num(float(d.mi_null_95[li]))} bits (95th percentile of {d.null_permutations} "
        "shuffles), "
        + (
            "so the domain does shape the routing here."
            if mi[1] > d.mi_null_95[li]
            else "so this layer's routing is not shown to depend on the domain."
        )
    )
    return View(
        "corpus_domain_shares",
        f"Expert share per domain (layer {layer})",
        text + " " + intervals_note(report),
        figure=finish(fig),
    )


def domain_information(report: CorpusReport) -> View:
    """Mutual information between domain and expert per layer, with intervals and the shuffled-domain
    chance level."""
    d = report.domain
    layers = [str(x) for x in d.layers]
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=layers,
            y=d.mi_bits.value,
            name="I(domain; expert)",
            marker={"color": OKABE_ITO[4]},
            error_y=_error(d.mi_bits, slice(None)),
            hovertemplate="layer %{x}: %{y:.3f} bits<extra></extra>",
        )
    )
    fig.add_trace(
        plotly_trace(
            go.Scatter,
            x=layers,
            y=d.mi_null_95,
            mode="markers",
            name="chance (shuffled domains, 95th pct)",
            marker={"symbol": "line-ew-open", "size": 28, "color": "#000", "line": {"width": 3}},
            hovertemplate="layer %{x}: chance up to %{y:.3f} bits<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": "How much the domain tells about the expert, per layer (bits)"},
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        yaxis={"title": {"text": "mutual information (bits)"}, "rangemode": "tozero"},
        plot_bgcolor="#FFFFFF",
    )
    top = best_index(d.mi_bits.value)
    if top is None:
        return View("corpus_domain_information", "Domain information per layer", NO_DATA, figure=finish(fig))
    best = top[0]
    above = [str(layer) for i, layer in enumerate(d.layers) if d.mi_bits.low[i] > d.mi_null_95[i]]
    D = len(d.domains)
    text = (
        f"I(domain; expert) over all assignments, in bits: 0 when routing ignores the domain, at most "
        f"log₂({D}) = {num(math.log2(D)) if D > 1 else '0'} bits with {D} domains. Highest in layer "
        f"{d.layers[best]}: {ci_text(*d.mi_bits.at(best))} bits. The black marks are chance: the 95th percentile "
        f"of the same statistic with the documents' domain labels shuffled ({d.null_permutations} shuffles). "
        + (
            f"The interval's lower end clears chance in layers {', '.join(above)}."
            if above
            else "No layer's interval clears chance: this corpus does not show domain specialisation."
        )
    )
    return View(
        "corpus_domain_information",
        "Domain information per layer",
        text + " " + intervals_note(report),
        figure=finish(fig),
    )


def domain_loss(report: CorpusReport) -> View:
    """Next-token loss per domain with intervals."""
    loss = report.loss
    colors = domain_colors(len(loss.domains))
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=loss.domains,
            y=loss.loss.value,
            marker={"color": colors},
            error_y=_error(loss.loss, slice(None)),
            hovertemplate="%{x}: %{y:.3f} nats per token<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": "Next-token loss per domain (nats per token)"},
        yaxis={"title": {"text": "loss (nats / token)"}},
        plot_bgcolor="#FFFFFF",
    )
    if best_index(loss.loss.value) is None:
        return View("corpus_domain_loss", "Loss per domain", NO_DATA, figure=finish(fig))
    (hard,), (easy,) = best_index(loss.loss.value), best_index(loss.loss.value, lowest=True)
    text = (
        f"Mean loss of the actual next token over the run: {ci_text(*loss.overall.at())} nats. The model finds "
        f"**{loss.domains[easy]}** easiest ({ci_text(*loss.loss.at(easy))}) and **{loss.domains[hard]}** hardest "
        f"({ci_text(*loss.loss.at(hard))})."
    )
    return View("corpus_domain_loss", "Loss per domain", text + " " + intervals_note(report), figure=finish(fig))


# ------------------------------------------------------------------ vocabulary
VOCAB_LABELS = {"input": "input token", "target": "true next token", "predicted": "predicted next token"}


def vocabulary_specialisation(report: CorpusReport) -> View:
    """Per layer, OLMoE's vocabulary specialisation for input, true next and predicted next tokens,
    with intervals and the share a token-blind router would give."""
    kinds = list(report.vocabulary)
    layers = [str(x) for x in report.domain.layers]
    fig = FigureBuilder()
    for i, kind in enumerate(kinds):
        v = report.vocabulary[kind]
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=layers,
                y=v.mean.value,
                name=VOCAB_LABELS[kind],
                marker={"color": OKABE_ITO[i]},
                error_y=_error(v.mean, slice(None)),
                hovertemplate=f"{VOCAB_LABELS[kind]}, layer %{{x}}: %{{y:.1%}}<extra></extra>",
            )
        )
    base = report.vocabulary[kinds[0]].baseline
    fig.add_trace(
        plotly_trace(
            go.Scatter,
            x=layers,
            y=base,
            mode="markers",
            name="a token-blind router (same counts)",
            marker={"symbol": "line-ew-open", "size": 34, "color": "#000", "line": {"width": 3}},
            hovertemplate="layer %{x}: a token-blind router would show %{y:.1%}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": "Vocabulary specialisation: how reliably a token id goes to one expert"},
        barmode="group",
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        yaxis={"title": {"text": "share to the token's top expert"}, "tickformat": ".0%", "range": [0, 1.05]},
        plot_bgcolor="#FFFFFF",
    )
    v = report.vocabulary["input"]
    top = best_index(v.mean.value)
    if top is None:
        text = f"No token id occurs {v.min_count} times in this run yet. " + NO_DATA
        return View("corpus_vocabulary", "Vocabulary specialisation per layer", text, figure=finish(fig))
    li = top[0]
    text = (
        "For each token id seen at least "
        f"{v.min_count} times, the share of its occurrences whose first-choice expert is the id's most frequent "
        "one (OLMoE's vocabulary specialisation, top-1), averaged over ids; by input token, by the true next "
        f"token and by the predicted next token. Input tokens are most specialised in layer {v.layers[li]}: "
        f"{ci_text(*v.mean.at(li), pct)} over {int(v.tokens_counted[li])} ids, against "
        f"{pct(float(v.baseline[li]))} for a router that ignored which token it saw (each occurrence drawn from the "
        "layer's first-choice shares, at the same counts: small counts alone make a top share look high). "
        "OLMoE's script averages over every id; rare ids inflate that average, hence the minimum count."
    )
    return View(
        "corpus_vocabulary",
        "Vocabulary specialisation per layer",
        text + " " + intervals_note(report),
        figure=finish(fig),
    )


def vocabulary_table(
    report: CorpusReport, layer: int, token_text: TokenText | None = None, per_expert: int = 5
) -> View:
    """The most specialised input tokens of each expert in one layer (at least the minimum count)."""
    _layer_index(report, layer)
    v = report.vocabulary["input"]
    t = v.table[v.table["layer"] == layer]
    rows = (
        t.sort_values(["expert", "spec", "occurrences"], ascending=[True, False, False])
        .groupby("expert")
        .head(per_expert)
    )

    def shown(token: int) -> str:
        return (visible(token_text(token)) or "∅") if token_text else str(token)

    table = pd.DataFrame(
        {
            "expert": rows["expert"].astype(int),
            "token": [shown(int(x)) for x in rows["token"]],
            "token id": rows["token"].astype(int),
            "occurrences": rows["occurrences"].astype(int),
            "% to this expert": (100 * rows["spec"]).round(1),
        }
    ).reset_index(drop=True)
    if len(t):
        top = t.iloc[0]
        name = shown(int(top.token))
        text = (
            f"Per expert of layer {layer}, the input tokens that most reliably go to it (first choice), among the "
            f"{len(t)} ids seen at least {v.min_count} times. The most reliable: {name!r} goes to expert "
            f"{int(top.expert)} in {pct(float(top.spec))} of its {int(top.occurrences)} occurrences."
        )
    else:
        text = f"No token id occurs {v.min_count} times in this run; a larger corpus gives this table its rows."
    return View("corpus_vocabulary_table", f"Tokens each expert takes (layer {layer})", text, table=table)


# ------------------------------------------------------------------ co-activation
def coactivation_heatmap(
    report: CorpusReport, layer: int, adjacent: bool = False, order: list[int] | None = None
) -> View:
    """A[a, b] (row a, column b) = share of a's tokens that also have b (OLMoE), in percent; the
    adjacent-rank variant counts only neighbouring ranks of the sorted set."""
    li = _layer_index(report, layer)
    co = report.coactivation_adjacent if adjacent else report.coactivation
    m = co.matrix.value[li]  # (E, E)
    E = m.shape[0]
    busiest = order is None and E > MANY_EXPERTS
    if busiest:  # many experts: the pairs of the busiest, busiest first
        tokens = co.tokens[li]  # (E,)
        order = busiest_first(tokens, SHOWN_EXPERTS)
    order = order or list(range(E))
    z = m[np.ix_(order, order)] * 100
    lo = co.matrix.low[li][np.ix_(order, order)] * 100
    hi = co.matrix.high[li][np.ix_(order, order)] * 100
    custom = np.dstack([lo, hi])
    labels = [str(e) for e in order]
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=z,
            x=labels,
            y=labels,
            customdata=custom,
            colorscale=around(float(co.baseline[li]) * 100, float(np.nanmax(z)) if np.isfinite(z).any() else 1.0),
            zmin=0,
            zmax=float(np.nanmax(z)) if np.isfinite(z).any() else 1.0,
            colorbar={"title": {"text": "% of a's tokens"}},
            hovertemplate="expert %{y} → expert %{x}: %{z:.1f}% (CI %{customdata[0]:.1f}–%{customdata[1]:.1f})<extra></extra>",
        )
    )
    kind = "adjacent-rank co-activation (OLMoE script variant)" if adjacent else "co-activation"
    which = f" (the {len(order)} busiest)" if busiest else ""
    fig.update_layout(
        title={"text": f"Expert {kind}, layer {layer}: % of row expert's tokens that also use the column expert"},
        xaxis={"title": {"text": "expert b" + which}, "type": "category"},
        yaxis={"title": {"text": "expert a" + which}, "type": "category", "autorange": "reversed"},
        plot_bgcolor="#FFFFFF",
        height=chart_height(len(order), extra=220) if len(order) > MANY_EXPERTS else None,
    )
    base = float(co.baseline[li])
    strongest = co.strongest(li)
    definition = (
        "A[a, b] = tokens whose ranked set has a and b next to each other (either order) ÷ tokens routed to a"
        if adjacent
        else "A[a, b] = tokens routed to both a and b ÷ tokens routed to a"
    )
    text = (
        f"{definition}; independent routing would give {pct(base)} everywhere: red cells are pairs that meet more "
        "often than that, blue ones less."
    )
    if strongest:
        a, b, v, low, high = strongest
        text += (
            f" The strongest pair is expert {a} → {b}: {ci_text(v, low, high, pct)} of expert {a}'s tokens, "
            f"{times(v / base) if base else 'n/a'} independence."
        )
    if busiest:
        text += f" With {E} experts the map shows the pairs among the {len(order)} busiest; the strongest pair is searched over all."
    return View(
        f"corpus_coactivation{'_adjacent' if adjacent else ''}",
        f"Co-activation (layer {layer})",
        text + " " + intervals_note(report),
        figure=finish(fig),
    )


# ------------------------------------------------------------------ reuse
def reuse_table(report: CorpusReport, by_domain: bool = False, layers: list[int] | None = None) -> View:
    """Mixtral Table 5: how often consecutive tokens share their first choice, and share any expert,
    per layer with random-routing baselines; ``by_domain``: one row per domain, two columns per
    layer (as the paper lays it out), for ``layers`` (default all)."""
    r = report.reuse
    chosen = [i for i, layer in enumerate(r.layers) if layers is None or layer in layers]
    if by_domain:
        table = pd.DataFrame({"domain": r.domains})
        for i in chosen:
            layer = r.layers[i]
            table[f"layer {layer}: same first choice"] = [
                pct_ci(*r.by_domain_first_choice_same.at(i, j)) for j in range(len(r.domains))
            ]
            table[f"layer {layer}: sets share an expert"] = [
                pct_ci(*r.by_domain_sets_intersect.at(i, j)) for j in range(len(r.domains))
            ]
    else:
        uniform = len({tuple(row) for row in r.baselines.round(6)}) == 1
        heads = ["same first choice", "sets share an expert", "mean overlap"]
        if uniform:
            b = r.baselines[0]
            heads = [
                f"{heads[0]} (random {pct(b[0])})",
                f"{heads[1]} (random {pct(b[1])})",
                f"{heads[2]} (random {num(b[2])})",
            ]
        rows = []
        for i in chosen:
            row = {"layer": r.layers[i], heads[0]: pct_ci(*r.first_choice_same.at(i))}
            row[heads[1]] = pct_ci(*r.sets_intersect.at(i))
            v, lo, hi = r.mean_overlap.at(i)
            row[heads[2]] = f"{num(v)} ({num(lo)}–{num(hi)})"
            if not uniform:
                row["random (first, share, overlap)"] = ", ".join(num(float(x)) for x in r.baselines[i])
            rows.append(row)
        table = pd.DataFrame(rows)
    name = "corpus_reuse_by_domain" if by_domain else "corpus_reuse"
    title = "Consecutive-token reuse" + (" per domain" if by_domain else "")
    top = best_index(r.first_choice_same.value)
    if top is None:
        return View(name, title, NO_DATA, table=table)
    best = top[0]
    text = (
        "Consecutive tokens of the same chunk: how often they share their first-choice expert, and how often their "
        f"expert sets share any expert (each cell: the share and its interval). Layer {r.layers[best]} reuses most: "
        f"the next token keeps the first choice {ci_text(*r.first_choice_same.at(best), pct)} of the time against "
        f"{pct(float(r.baselines[best, 0]))} for random routing over {int(r.pairs[best]):,} pairs. "
        + ("Per domain, as Mixtral's Table 5 reports it. " if by_domain else "")
        + intervals_note(report)
    )
    return View(name, title, text, table=table)


# ------------------------------------------------------------------ coverage and dormant experts
def coverage_curves(report: CorpusReport) -> View:
    """Per layer: share of assignments taken by the N busiest experts, with intervals, against uniform."""
    cov = report.coverage
    E = cov.curve.value.shape[-1]
    x = list(range(1, E + 1))
    fig = FigureBuilder(
        plotly_trace(
            go.Scatter, x=x, y=[n / E for n in x], mode="lines", name="uniform", line={"dash": "dash", "color": "#777"}
        )
    )
    colors = DOMAIN_PALETTE
    for i, layer in enumerate(cov.layers):
        fig.add_trace(
            plotly_trace(
                go.Scatter,
                x=x,
                y=cov.curve.value[i],
                mode="lines+markers",
                name=f"layer {layer}",
                line={"color": colors[i % len(colors)]},
                error_y=_error(cov.curve, i, slice(None)),
                hovertemplate=f"layer {layer}: the %{{x}} busiest experts take %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": "Coverage: share of assignments taken by the N busiest experts"},
        xaxis={"title": {"text": "N busiest experts"}},
        yaxis={"title": {"text": "share of assignments"}, "tickformat": ".0%", "range": [0, 1.02]},
        plot_bgcolor="#FFFFFF",
    )
    half = [cov.experts_for(i, 0.5) for i in range(len(cov.layers))]
    li = int(np.argmin(half))
    top1 = cov.curve.at(li, 0)
    text = (
        f"Experts ranked by load in each layer, then the cumulative share of assignments. Uniform routing is the "
        f"dashed diagonal. Half of all assignments go to {half[li]} of {E} experts in layer {cov.layers[li]} "
        f"(the busiest alone takes {ci_text(*top1, pct)}); per layer: "
        + per_layer_values(list(cov.layers), half)
        + ". "
        + intervals_note(report)
    )
    return View("corpus_coverage", "Coverage curves", text, figure=finish(fig))


def dormant_curve(report: CorpusReport) -> View:
    """Experts not yet routed to after n tokens, per layer, with a band over document orders."""
    d = report.dormant
    fig = FigureBuilder()
    colors = DOMAIN_PALETTE
    for i, layer in enumerate(d.layers):
        c = colors[i % len(colors)]
        fig.add_trace(
            plotly_trace(
                go.Scatter,
                x=np.concatenate([d.tokens, d.tokens[::-1]]),
                y=np.concatenate([d.high[i], d.low[i][::-1]]),
                fill="toself",
                fillcolor=c,
                opacity=0.12,
                legendgroup=f"layer {layer}",
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            plotly_trace(
                go.Scatter,
                x=d.tokens,
                y=d.median[i],
                mode="lines",
                name=f"layer {layer}",
                legendgroup=f"layer {layer}",
                line={"color": c, "shape": "hv", "width": 2.5},
                hovertemplate=f"layer {layer}: %{{y:.0f}} experts unused after %{{x:,.0f}} tokens<extra></extra>",
            )
        )
    settled = max(
        (
            float(d.tokens[np.flatnonzero(d.high[i] <= d.final[i])[0]])
            for i in range(len(d.layers))
            if (d.high[i] <= d.final[i]).any()
        ),
        default=float(d.tokens[-1]),
    )
    right = math.log10(
        max(10.0, min(float(d.tokens[-1]), settled * 4))
    )  # show where the curves settle, not the empty tail
    fig.update_layout(
        title={"text": "Dormant experts: experts never routed to after n tokens"},
        xaxis={"title": {"text": "tokens seen"}, "type": "log", "range": [0, right]},
        yaxis={"title": {"text": "experts not yet used"}, "rangemode": "tozero"},
        plot_bgcolor="#FFFFFF",
    )
    final = [int(x) for x in d.final]
    never = [f"layer {layer}: {n}" for layer, n in zip(d.layers, final) if n]
    last_new = []
    for i in range(len(d.layers)):
        zero = np.flatnonzero(d.median[i] <= d.final[i])
        last_new.append(int(d.tokens[zero[0]]) if len(zero) else int(d.tokens[-1]))
    li = int(np.argmax(last_new))
    text = (
        "How many experts have not been used yet after the first n tokens, median over "
        f"{d.orders} random orders of the documents (band: {report.level:.0%} of orders). "
        + (f"Never used in the whole run: {', '.join(never)}. " if never else "Every expert of every layer was used. ")
        + f"Layer {d.layers[li]} needs the most text before all its used experts appear: about {last_new[li]:,} tokens "
        "(median order). An expert that stays dormant on a large, varied corpus is a candidate for pruning; on a "
        "small one, it may simply not have met its tokens yet."
    )
    return View("corpus_dormant", "Dormant experts as tokens accumulate", text, figure=finish(fig))


# ------------------------------------------------------------------ saturation and importance
def saturation(report: CorpusReport) -> View | None:
    """Router saturation per layer against the reference checkpoint (None without one)."""
    s = report.saturation
    if s is None:
        return None
    layers = [str(x) for x in s.layers]
    fig = FigureBuilder()
    for est, name, color in (
        (s.topk_overlap, "top-k overlap / k", OKABE_ITO[2]),
        (s.first_choice_match, "same first choice", OKABE_ITO[0]),
    ):
        fig.add_trace(
            plotly_trace(
                go.Bar, x=layers, y=est.value, name=name, marker={"color": color}, error_y=_error(est, slice(None))
            )
        )
    fig.update_layout(
        title={"text": f"Router saturation against {s.reference_model}"},
        barmode="group",
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        yaxis={"title": {"text": "agreement"}, "tickformat": ".0%", "range": [0, 1.05]},
        plot_bgcolor="#FFFFFF",
    )
    top = best_index(s.topk_overlap.value, lowest=True)
    if top is None:
        return View("corpus_saturation", "Router saturation", NO_DATA, figure=finish(fig))
    lo = top[0]
    text = (
        f"On the same tokens, the share of each token's native top-k that the checkpoint {s.reference_model} also "
        "picks (OLMoE's router saturation), and how often the first choice is the same. The least settled layer is "
        f"{s.layers[lo]}: {ci_text(*s.topk_overlap.at(lo), pct)}. " + intervals_note(report)
    )
    return View("corpus_saturation", "Router saturation", text, figure=finish(fig))


def importance_vs_load(report: CorpusReport, layer: int) -> View | None:
    """Per expert of one layer: corpus load share (x) against Δ loss when ablated (y, with
    intervals), and the rank correlation with its interval (None when importance was not run)."""
    imp = report.importance
    if imp is None:
        return None
    li = _layer_index(report, layer)
    E = imp.load_share.shape[-1]
    colors = expert_colors(E)
    fig = FigureBuilder(
        plotly_trace(
            go.Scatter,
            x=imp.load_share[li],
            y=imp.delta_loss.value[li],
            mode="markers+text" if E <= 16 else "markers",
            text=[str(e) for e in range(E)],
            textposition="top center",
            marker={"size": 11, "color": colors, "line": {"width": 1, "color": "#333"}},
            error_y=_error(imp.delta_loss, li, slice(None)),
            hovertemplate="expert %{text}: load share %{x:.1%}, Δ loss %{y:+.4f} nats<extra></extra>",
        )
    )
    fig.add_hline(0, line={"color": "#999", "width": 1})
    fig.update_layout(
        title={"text": f"Ablating one expert: loss change against load share, layer {layer}"},
        xaxis={"title": {"text": "share of the layer's assignments (whole corpus)"}, "tickformat": ".0%"},
        yaxis={"title": {"text": "Δ loss when ablated (nats / token)"}},
        plot_bgcolor="#FFFFFF",
    )
    rho = imp.rank_correlation.at(li)
    top = best_index(imp.delta_loss.value[li])
    if top is None:
        return View("corpus_importance", f"Importance against load (layer {layer})", NO_DATA, figure=finish(fig))
    e = top[0]
    text = (
        f"Each expert of layer {layer} ablated alone (its logit masked, the next-best expert takes its slot) on "
        f"{imp.documents} sampled documents: the change of the mean next-token loss, against its load share over "
        f"the whole corpus. Expert {e} matters most: {ci_text(*imp.delta_loss.at(li, e), lambda x: f'{x:+.4f}')} "
        f"nats per token with {pct(float(imp.load_share[li, e]))} of the load. Spearman rank correlation between "
        f"|Δ loss| and load: {ci_text(*rho, lambda x: f'{x:+.2f}')}"
        + (" — load is a poor guide to importance here." if math.isfinite(rho[0]) and rho[1] <= 0 else ".")
        + " "
        + intervals_note(report)
    )
    return View("corpus_importance", f"Importance against load (layer {layer})", text, figure=finish(fig))


# ------------------------------------------------------------------ positions
def position_profile(agg: CorpusAggregates, layer: int) -> View:
    """Share of each expert's assignments by position in the chunk (heatmap expert x position bucket)."""
    li = agg.layer_index(layer)
    counts = agg.positions[li].astype(float)  # (P, E)
    totals = counts.sum(axis=1, keepdims=True)
    used = np.flatnonzero(totals[:, 0] > 0)
    share = (counts[used] / totals[used]).T  # (E, P_used)
    b = agg.meta.position_bucket
    x = [f"{p * b}–{p * b + b - 1}" if b > 1 else str(p) for p in used]
    E = agg.num_experts
    rows: list = list(range(E))
    if E > MANY_EXPERTS:  # many experts: the busiest, busiest first
        load = counts.sum(axis=0)  # (E,)
        rows = busiest_first(load, SHOWN_EXPERTS)
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=share[rows],
            x=x,
            y=[f"e{e}" for e in rows] if E > MANY_EXPERTS else rows,
            colorscale="Cividis",
            zmin=0,
            colorbar={"title": {"text": "share"}, "tickformat": ".0%"},
            hovertemplate="positions %{x}, expert %{y}: %{z:.1%}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"Expert share by position in the chunk, layer {layer}"},
        xaxis={"title": {"text": "position in the chunk"}, "type": "category"},
        plot_bgcolor="#FFFFFF",
    )
    if E > MANY_EXPERTS:
        fig.update_yaxes(title_text=f"expert (the {len(rows)} busiest)", type="category", autorange="reversed")
        fig.update_layout(height=chart_height(len(rows)))
    else:
        expert_axis(fig, E)
    first = share[:, 0]
    rest = counts[used[1:]].sum(axis=0) / max(1.0, counts[used[1:]].sum()) if len(used) > 1 else first
    e = int(np.argmax(np.abs(first - rest)))
    text = (
        f"Each column is one range of positions (buckets of {b} tokens) in the run's chunks of up to "
        f"{agg.meta.window} tokens; each cell is that expert's share of the assignments there. At the start of a "
        f"chunk expert {e} takes {pct(float(first[e]))}, against {pct(float(rest[e]))} further on"
        + (
            ": routing depends on position as well as on content (the first tokens have the least context)."
            if abs(float(first[e] - rest[e])) >= 0.03
            else ": no expert's share moves by 3 points or more, so position matters little here."
        )
    )
    return View("corpus_positions", f"Routing by position (layer {layer})", text, figure=finish(fig))


def corpus_views(
    report: CorpusReport, agg: CorpusAggregates, layer: int, token_text: TokenText | None = None
) -> list[View]:
    """The Corpus page, top to bottom (views without data, such as saturation without a reference, left out)."""
    views = [
        domain_information(report),
        domain_shares(report, layer),
        domain_loss(report),
        vocabulary_specialisation(report),
        vocabulary_table(report, layer, token_text),
        coactivation_heatmap(report, layer),
        reuse_table(report),
        coverage_curves(report),
        dormant_curve(report),
        position_profile(agg, layer),
        saturation(report),
        importance_vs_load(report, layer),
    ]
    return [v for v in views if v is not None]
