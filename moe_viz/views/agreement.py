"""Views of how far two routings of the same tokens agree, per layer and per token."""

from __future__ import annotations

import plotly.graph_objects as go

from ..agreement import Agreement
from ..trace import Trace
from ._display import code_token, pct, plural, visible
from ._plotly import FigureBuilder, finish, plotly_trace
from ._view import View


def agreement_by_layer(ag: Agreement) -> View:
    """Per MoE layer: mean top-k overlap / k and top-1 match rate of two routings."""
    t = ag.per_layer
    fig = FigureBuilder()
    for column, name, color in (
        ("topk_overlap", "top-k overlap / k", "#0072B2"),
        ("top1_match", "top-1 match", "#E69F00"),
    ):
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=[str(layer) for layer in t["layer"]],
                y=t[column].to_numpy(),
                name=name,
                marker={"color": color},
                hovertemplate=f"layer %{{x}}: {name} %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": f"Routing agreement of {ag.a_name} and {ag.b_name}, per layer"},
        barmode="group",
        xaxis={"title": {"text": "MoE layer"}, "type": "category"},
        yaxis={"title": {"text": "agreement"}, "tickformat": ".0%", "range": [0, 1.05]},
        legend={"orientation": "h", "y": -0.2},
        plot_bgcolor="#FFFFFF",
    )
    low = t.loc[t["topk_overlap"].idxmin()]
    high = t.loc[t["topk_overlap"].idxmax()]
    text = (
        f"For every token, the overlap of the experts that processed it in `{ag.a_name}` and in `{ag.b_name}`, "
        f"divided by k (the larger run's k per token, so identical routing scores 100%), averaged per layer; and how "
        "often both runs agree on the first-choice expert. "
    )
    if (t["topk_overlap"] == 1.0).all():
        text += f"The two routings are identical in all {plural(len(t), 'layer')}. "
    else:
        differ = int((t["topk_overlap"] < 1.0).sum())
        text += (
            f"They differ in {differ} of {plural(len(t), 'layer')}; agreement is lowest in layer {int(low.layer)} "
            f"(overlap {pct(float(low.topk_overlap))}, top-1 match {pct(float(low.top1_match))}) and highest in "
            f"layer {int(high.layer)} (overlap {pct(float(high.topk_overlap))}). "
        )
    text += (
        "Between an early and the final checkpoint this is OLMoE's router saturation; between a serving engine and "
        "moe-viz, the drift that kernels, batching and precision cause."
    )
    return View("agreement_by_layer", "Agreement between two routings", text, figure=finish(fig))


def agreement_tokens(ag: Agreement, a: Trace, b: Trace, layer: int) -> View:
    """The tokens of ``layer`` whose expert sets differ between the two routings, least overlap first."""
    rows = ag.tokens(a, b, layer)
    differ = rows[rows["overlap"] < 1.0].sort_values(["overlap", "position"], kind="stable").reset_index(drop=True)
    T = len(rows)
    if differ.empty:
        text = f"In layer {layer} all {plural(T, 'token')} go to the same experts in both routings."
    else:
        first = differ.iloc[0]
        text = (
            f"{len(differ)} of {plural(T, 'token')} in layer {layer} are processed by a different set of experts "
            f"({pct(len(differ) / T)}). The least overlap is at {code_token(str(first.token))} (position "
            f"{int(first.position)}): {first.experts_a or 'no expert'} in `{ag.a_name}` against "
            f"{first.experts_b or 'no expert'} in `{ag.b_name}`."
        )
    table = differ.assign(token=[visible(t) for t in differ["token"]]) if not differ.empty else rows.head(0)
    return View("agreement_tokens", f"Tokens routed differently, layer {layer}", text, table=table)
