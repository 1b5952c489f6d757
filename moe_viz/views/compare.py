"""Views that compare two runs of the same tokens: the effect of a mode on the next-token
predictions, and which experts each token gained or lost."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import metrics
from ..trace import Trace
from ._display import bin_mean, bin_note, code_token, num, pct, plural, token_bins
from ._experts import MANY_EXPERTS, SHOWN_EXPERTS, category_axis, chart_height
from ._plotly import (
    DROPPED_COLOR,
    FLIP_COLOR,
    SEQUENTIAL,
    WEBGL_THRESHOLD,
    FigureBuilder,
    expert_axis,
    f32,
    finish,
    line_trace,
    plotly_trace,
    scatter,
    token_axis,
)
from ._view import View


def mode_effect(reference: Trace, other: Trace) -> View:
    """Top: KL(reference || other) per position with top-1 flips marked; bottom: change in
    log-prob of the actual next token (other - reference). WebGL for long prompts."""
    e = metrics.mode_effect(reference, other)
    T = reference.num_tokens
    pos = np.arange(T)
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("KL(reference ‖ other), nats", "Δ log p(actual next token)"),
    )
    fig.add_trace(line_trace(pos, e.kl, "KL", "#0072B2", "position %{x}: KL %{y:.4f}"), row=1, col=1)
    flips = np.asarray(e.flipped_positions, dtype=np.int64)
    fig.add_trace(
        plotly_trace(
            scatter(len(flips)),
            x=flips,
            y=f32(e.kl[flips]) if len(flips) else np.zeros(0, dtype=np.float32),
            mode="markers",
            name="top-1 flip",
            marker={"symbol": "x", "size": 9, "color": FLIP_COLOR},
            hovertemplate="position %{x}: top-1 prediction changed<extra></extra>",
        ),
        row=1,
        col=1,
    )
    delta = line_trace(pos, e.delta_logprob, "Δ log p", "#009E73", "position %{x}: Δ %{y:.3f}")
    fig.add_trace(delta, row=2, col=1)
    fig.add_hline(y=0, line={"color": "#999999", "width": 1}, row=2, col=1)
    fig.update_layout(
        title={
            "text": f"Effect of {other.policy} against {reference.policy}: mean KL {e.mean_kl:.4f}, "
            f"top-1 flips {len(e.flipped_positions)}/{T} ({e.flip_rate:.0%})"
            + (" — WebGL" if T > WEBGL_THRESHOLD else "")
        },
        legend={"orientation": "h", "y": -0.15},
        plot_bgcolor="#FFFFFF",
    )
    token_axis(fig, reference, 1, row=2, col=1)
    t = int(e.kl.argmax()) if T else 0
    text = (
        f"Switching from `{reference.policy}` to `{other.policy}` changes the top-1 next-token prediction at "
        f"{len(e.flipped_positions)} of {T} positions ({pct(e.flip_rate)}). The mean KL divergence is "
        f"{num(e.mean_kl)} nats, largest after {code_token(reference.tokens[t])} (position {t}, {num(float(e.kl[t]))})."
    )
    if not math.isnan(e.mean_delta_logprob):
        d = e.mean_delta_logprob
        if d == 0:
            text += " The actual next tokens' log-probabilities do not change."
        else:
            verdict = "less" if d < 0 else "more"
            text += (
                f" On average the actual next token's log-probability changes by {d:+.3g} "
                f"(the text becomes {verdict} likely, ×{math.exp(d):.3g} per token)."
            )
    return View("mode_effect", f"Mode effect, {other.policy}", text, figure=finish(fig))


DIFF_LABELS = ("neither", "both", "reference only", "other only")
DIFF_COLORS = ("#F2F2F2", "#999999", "#E69F00", "#0072B2")


def routing_diff(reference: Trace, other: Trace, layer: int) -> View:
    """Expert x token map of which run sent the token to the expert (kept assignments): both,
    reference only, other only; other's dropped assignments as crosses. Long prompts show, per
    token bin, the share of tokens whose membership at that expert differs."""
    d = metrics.routing_diff(reference, other, layer)
    T, E = d.reference_sets.shape
    size = token_bins(T)
    rows, labels = list(range(E)), np.arange(E)
    if E > MANY_EXPERTS:  # many experts: the ones whose tokens changed most, then the busiest
        changed = (d.reference_sets != d.other_sets).sum(dim=0)  # (E,)
        used = (d.reference_sets | d.other_sets).sum(dim=0)  # (E,)
        order = sorted(range(E), key=lambda e: (-int(changed[e]), -int(used[e]), e))
        rows = order[:SHOWN_EXPERTS]
        labels = [f"e{e}" for e in rows]
    if size == 1:
        code = d.reference_sets.long() * 1 + d.other_sets.long() * 3  # 0, 1, 3, 4
        code = torch.tensor([0, 2, 0, 3, 1])[code]  # neither 0, both 1, ref only 2, other only 3
        n = len(DIFF_COLORS)
        scale = []
        for i, c in enumerate(DIFF_COLORS):
            scale += [[i / n, c], [(i + 1) / n, c]]
        fig = FigureBuilder(
            plotly_trace(
                go.Heatmap,
                z=code[:, rows].t().numpy().astype(np.int8),
                x=np.arange(T),
                y=labels,
                colorscale=scale,
                zmin=-0.5,
                zmax=n - 0.5,
                colorbar={"tickvals": list(range(n)), "ticktext": list(DIFF_LABELS), "title": {"text": ""}},
                hovertemplate="position %{x}, expert %{y}: %{z}<extra></extra>",
            )
        )
        oth = other.layer(layer)
        pos = torch.arange(T).unsqueeze(1).expand_as(oth.index)
        marked = oth.dropped & torch.isin(oth.index, torch.tensor(rows))  # (T, k') drops on the rows drawn
        if marked.any():
            where = {e: label for e, label in zip(rows, labels, strict=True)}
            fig.add_trace(
                plotly_trace(
                    scatter(int(marked.sum())),
                    x=pos[marked].numpy(),
                    y=np.array([where[e] for e in oth.index[marked].tolist()]),
                    mode="markers",
                    name=f"dropped in {other.policy}",
                    marker={"symbol": "x", "size": 8, "color": DROPPED_COLOR, "line": {"width": 1, "color": "#000000"}},
                    hovertemplate="position %{x}: expert %{y} dropped<extra></extra>",
                )
            )
    else:
        differs = (d.reference_sets != d.other_sets).double()  # (T, E)
        share = bin_mean(differs, size)[:, rows]  # (B, rows)
        fig = FigureBuilder(
            plotly_trace(
                go.Heatmap,
                z=f32(share.t()),
                x=np.arange(share.shape[0]) * size,
                y=labels,
                colorscale=SEQUENTIAL,
                zmin=0.0,
                zmax=1.0,
                colorbar={"title": {"text": "share changed"}},
                hovertemplate="bin from %{x}, expert %{y}: %{z:.2f} of tokens changed<extra></extra>",
            )
        )
    fig.update_layout(
        title={
            "text": f"Routing difference at layer {layer}: {reference.policy} (reference) vs {other.policy}; "
            f"{d.num_changed}/{T} tokens changed" + bin_note(size, T)
        },
        legend={"orientation": "h", "y": -0.25},
        plot_bgcolor="#FFFFFF",
    )
    token_axis(fig, reference, size)
    if E > MANY_EXPERTS:
        category_axis(fig, list(labels), f"expert: the {len(rows)} whose tokens changed most", reverse=True)
        fig.update_layout(height=chart_height(len(rows)))
    else:
        expert_axis(fig, E)
    gained, lost = int(d.added.sum()), int(d.removed.sum())
    oth = other.layer(layer)
    dropped_at = metrics.membership(oth, "routed") & ~d.other_sets  # (T, E) assignments other dropped
    lost_to_drops = int((dropped_at & d.reference_sets).sum())  # of the lost ones: dropped, not re-routed
    text = (
        f"Under `{other.policy}`, **{d.num_changed} of {T}** tokens are processed by a different set of experts than "
        f"under `{reference.policy}` in layer {layer}: {plural(gained, 'expert assignment')} gained and {lost} lost"
    )
    if lost_to_drops:
        text += f"; {lost_to_drops} of the lost ones were dropped for lack of capacity"
    elsewhere = int(dropped_at.sum()) - lost_to_drops
    if elsewhere:
        were = "was" if elsewhere == 1 else "were"
        text += f"; {plural(elsewhere, 'more dropped assignment')} {were} at experts `{reference.policy}` did not use"
    text += "."
    if E > MANY_EXPERTS:
        text += f" With {E} experts the map shows the {len(rows)} whose tokens changed most; the counts cover all {E}."
    return View("routing_diff", f"Routing diff, {other.policy}, layer {layer}", text, figure=finish(fig))
