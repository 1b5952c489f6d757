"""Views of a generation split into prefill (the prompt) and decode (the generated tokens)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from .. import phases
from ..trace import Trace
from ._display import num, pct, plural
from ._experts import MANY_EXPERTS, SHOWN_EXPERTS
from ._plotly import FigureBuilder, expert_axis, finish, plotly_trace
from ._view import View


def prefill_decode(trace: Trace, layer: int) -> View:
    """Grouped bars of each expert's load share among the prompt's tokens and among the generated
    ones at ``layer``; the text cites both balances and their Jensen-Shannon divergence."""
    split = phases.phase_split(trace)
    i = split.layers.index(trace.layer(layer).layer)
    p, g = split.prompt_shares[i], split.generated_shares[i]  # (E,) each
    E = len(p)
    bars: list = list(range(E))
    if E > MANY_EXPERTS:  # many experts: those whose share moves most between the phases
        bars = (g - p).abs().argsort(descending=True)[:SHOWN_EXPERTS].tolist()
    fig = FigureBuilder()
    for name, shares, color in (("prompt (prefill)", p, "#56B4E9"), ("generated (decode)", g, "#D55E00")):
        fig.add_trace(
            plotly_trace(
                go.Bar,
                x=[f"e{e}" for e in bars] if E > MANY_EXPERTS else np.arange(E),
                y=shares[bars].numpy(),
                name=name,
                marker={"color": color},
                hovertemplate=f"{name}: expert %{{x}} takes %{{y:.1%}}<extra></extra>",
            )
        )
    js = split.js_divergence[layer]
    fig.update_layout(
        title={"text": f"Load share, prompt against generated tokens, layer {layer} (JS divergence {js:.3f} nats)"},
        barmode="group",
        yaxis={"title": {"text": "share of kept assignments"}, "tickformat": ".0%"},
        legend={"orientation": "h", "y": -0.2},
        plot_bgcolor="#FFFFFF",
    )
    if E > MANY_EXPERTS:
        fig.update_xaxes(title_text=f"expert (the {len(bars)} whose share moves most)", type="category")
    else:
        expert_axis(fig, E, axis="x")
    rows = split.table[split.table["layer"] == layer].set_index("phase")
    shift = int((g - p).abs().argmax())
    generated = trace.num_tokens - split.boundary
    text = (
        f"The {plural(split.boundary, 'prompt token')} were routed in one prefill forward, the "
        f"{plural(generated, 'generated token')} one decode step at a time. In layer {layer}, the prompt's load has "
        f"CV {num(float(rows.loc['prompt', 'cv']))} and MaxVio {num(float(rows.loc['prompt', 'max_vio']))}; the "
        f"generated tokens' has CV {num(float(rows.loc['generated', 'cv']))} and MaxVio "
        f"{num(float(rows.loc['generated', 'max_vio']))}. Expert {shift} moves most: {pct(float(p[shift]))} of the "
        f"prompt's assignments against {pct(float(g[shift]))} of the generated ones."
    )
    if not math.isnan(js):
        text += (
            f" The Jensen-Shannon divergence between the two load distributions is {js:.3f} nats (0 = the same, "
            f"at most ln 2 ≈ 0.693); with few generated tokens part of it is sampling noise."
        )
    return View("prefill_decode", f"Prefill against decode, layer {layer}", text, figure=finish(fig))
