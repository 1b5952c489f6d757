"""Views of the sweeps: drop rate, top-1 flips and loss against the capacity factor, and
flips, KL and loss against k with the share of expert compute."""

from __future__ import annotations

import numpy as np
import pandas as pd
from plotly.subplots import make_subplots

from ._display import num, pct
from ._plotly import expert_colors, finish, plotly_trace
from ._view import View

LINE = "lines+markers"


def _scatter(x: object, y: object, name: str, color: str, hover: str, dash: str | None = None) -> dict:
    import plotly.graph_objects as go

    return plotly_trace(
        go.Scatter,
        x=x,
        y=y,
        mode=LINE,
        name=name,
        line={"color": color, "dash": dash} if dash else {"color": color},
        hovertemplate=hover + "<extra></extra>",
    )


def capacity_sweep(effects: pd.DataFrame, drops: pd.DataFrame, native_loss: float) -> View:
    """Three panels over the capacity factor (log axis): drop rate per layer, top-1 flip rate
    against native, next-token loss (native marked). The text reads the curve off for a student."""
    layers = sorted(drops["layer"].unique().tolist())
    colors = expert_colors(max(len(layers), 1))
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.07,
        subplot_titles=("dropped assignments, per layer", "top-1 flips against native", "next-token loss (nats)"),
    )
    for i, layer in enumerate(layers):
        d = drops[drops["layer"] == layer]
        hover = f"layer {layer}: factor %{{x:g}}, %{{y:.1%}} dropped"
        fig.add_trace(_scatter(d["factor"], d["drop_rate"], f"layer {layer}", colors[i], hover), row=1, col=1)
    fig.add_trace(
        _scatter(effects["factor"], effects["flip_rate"], "top-1 flips", "#D55E00", "factor %{x:g}: %{y:.1%} flip"),
        row=2,
        col=1,
    )
    fig.add_trace(
        _scatter(effects["factor"], effects["loss"], "loss", "#0072B2", "factor %{x:g}: loss %{y:.4f}"), row=3, col=1
    )
    fig.add_hline(y=native_loss, line={"color": "#999999", "dash": "dot"}, row=3, col=1)
    ticks = {
        "tickmode": "array",
        "tickvals": list(effects["factor"]),
        "ticktext": [f"{f:.3g}" for f in effects["factor"]],
    }
    fig.update_xaxes(type="log", **ticks)
    fig.update_xaxes(row=3, col=1, title_text="capacity factor (log scale)")
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], row=2, col=1)
    fig.update_layout(
        title={"text": "Capacity sweep: what the capacity factor costs"},
        height=640,
        legend={"orientation": "h", "y": -0.12},
        plot_bgcolor="#FFFFFF",
    )
    mean_drop = drops.groupby("factor")["drop_rate"].mean()  # factor -> mean over layers
    low, high = effects.iloc[0], effects.iloc[-1]
    free = mean_drop[mean_drop == 0]
    first_free = float(free.index.min()) if len(free) else None
    text = (
        f"Each point reruns the prompt with every expert's capacity C = ⌈factor × T × k / E⌉. At factor "
        f"{low.factor:g}, {pct(float(mean_drop.iloc[0]))} of assignments are dropped (mean over layers), "
        f"{pct(low.flip_rate)} of top-1 predictions flip and the loss is {num(low.loss)} nats "
        f"(native {num(native_loss)})."
    )
    if first_free is not None:
        text += (
            f" From factor {first_free:g} on nothing is dropped: C covers the busiest expert in every layer, and "
            "the run equals top-k routing."
        )
    else:
        text += f" Even at factor {high.factor:g} some assignments are dropped: one expert takes most tokens."
    text += (
        " Below 1 the buffers cannot hold an evenly spread load, let alone an uneven one: that is why training "
        "and serving systems use factors above 1."
    )
    return View("capacity_sweep", "Capacity sweep", text, figure=finish(fig))


def k_sweep(table: pd.DataFrame, native_k: int, native_loss: float) -> View:
    """Two panels over k = 1..E: top-1 flips and mean KL against native, and the next-token loss,
    with the share of expert compute (k / E) on the hover and the native k marked."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=("top-1 flips and mean KL against native", "next-token loss (nats)"),
    )
    custom = np.asarray(table["compute_share"])
    fig.add_trace(
        _scatter(table["k"], table["flip_rate"], "top-1 flips", "#D55E00", "k = %{x}: %{y:.1%} flip"), row=1, col=1
    )
    fig.add_trace(_scatter(table["k"], table["mean_kl"], "mean KL (nats)", "#009E73", "k = %{x}: KL %{y:.4f}"), 1, 1)
    loss = _scatter(table["k"], table["loss"], "loss", "#0072B2", "k = %{x}: loss %{y:.4f}, compute %{customdata:.0%}")
    loss["customdata"] = custom
    fig.add_trace(loss, row=2, col=1)
    fig.add_hline(y=native_loss, line={"color": "#999999", "dash": "dot"}, row=2, col=1)
    for row in (1, 2):
        fig.add_vline(x=native_k, line={"color": "#999999", "dash": "dash"}, row=row, col=1)
    fig.update_xaxes(title_text="k (experts per token)", row=2, col=1, dtick=1)
    fig.update_layout(
        title={"text": f"k sweep: experts per token against quality (native k = {native_k})"},
        height=520,
        legend={"orientation": "h", "y": -0.15},
        plot_bgcolor="#FFFFFF",
    )
    best = table.loc[table["loss"].idxmin()]
    one = table.iloc[0]
    text = (
        f"Each point runs every token through its k best experts (compute share k / E). At k = {int(one.k)} "
        f"({pct(one.compute_share)} of the experts) {pct(one.flip_rate)} of top-1 predictions differ from native and "
        f"the loss is {num(one.loss)} nats; at the native k = {native_k} nothing differs (loss {num(native_loss)}). "
        f"The lowest loss on this prompt is at k = {int(best.k)} ({num(best.loss)} nats, {pct(best.compute_share)} of "
        "the expert compute): a model trained at one k is not always best at it on one prompt, and more experts "
        "cost proportionally more."
    )
    return View("k_sweep", "k sweep", text, figure=finish(fig))
