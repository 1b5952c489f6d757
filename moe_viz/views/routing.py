"""Views of where tokens go: the token x expert heatmap, the text coloured by expert, one token's
router distribution and its next-token predictions.

Each function takes a trace and the view's arguments and returns a ``View`` whose figure and
explanation are built from the same numbers.
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
import torch

from .. import metrics
from ..trace import Trace
from ._display import bin_mean, bin_note, bin_sum, code_token, display_token, pct, token_bins
from ._plotly import (
    DROPPED_COLOR,
    KEPT_MARK_COLOR,
    SEQUENTIAL,
    FigureBuilder,
    expert_axis,
    expert_colors,
    f32,
    finish,
    plotly_trace,
    scatter,
    text_color,
    token_axis,
)
from ._view import View

LOW_MARGIN = 0.05  # top-k margins below this count as fragile decisions
TITLE_EXPERTS = 16  # hover titles list at most this many experts, then the rest summed


def _applied_k(trace: Trace, layer: int) -> int:
    return int(trace.layer(layer).index.shape[1])


# ----------------------------------------------------------------------------- token x expert heatmap
def routing_heatmap(trace: Trace, layer: int) -> View:
    """Router probability per (expert, token); kept assignments marked with white dots, dropped
    ones with vermillion crosses. Long prompts show the mean probability per token bin and one
    cross per (bin, expert) with dropped assignments (hover: how many)."""
    lt = trace.layer(layer)
    T, E = lt.num_tokens, lt.num_experts
    k_applied = _applied_k(trace, layer)
    size = token_bins(T)
    probs = bin_mean(lt.router_probs, size)  # (B, E)
    x = np.arange(probs.shape[0]) * size if size > 1 else np.arange(T)
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(probs.t()),
            x=x,
            y=np.arange(E),
            colorscale=SEQUENTIAL,
            zmin=0.0,
            colorbar={"title": {"text": "router p" if size == 1 else "mean p"}},
            hovertemplate=("position %{x}" if size == 1 else "bin from %{x}")
            + "<br>expert %{y}<br>p = %{z:.3f}<extra></extra>",
            name="router probability",
        )
    )
    pos = torch.arange(T).unsqueeze(1).expand_as(lt.index)  # (T, k')
    if size == 1:
        kept = ~lt.dropped
        if k_applied < E:  # ensemble: every expert is chosen, no markers needed
            fig.add_trace(
                plotly_trace(
                    scatter(int(kept.sum())),
                    x=pos[kept].numpy(),
                    y=lt.index[kept].numpy(),
                    mode="markers",
                    name="chosen",
                    marker={
                        "symbol": "circle",
                        "size": 5,
                        "color": KEPT_MARK_COLOR,
                        "line": {"width": 1, "color": "#000000"},
                    },
                    hovertemplate="position %{x}: expert %{y} chosen<extra></extra>",
                )
            )
        dropped_x, dropped_y, dropped_n = pos[lt.dropped].numpy(), lt.index[lt.dropped].numpy(), None
    else:
        onehot = torch.zeros(T, E, dtype=torch.long)
        ones = torch.ones(int(lt.dropped.sum()), dtype=torch.long)
        onehot.index_put_((pos[lt.dropped], lt.index[lt.dropped]), ones, accumulate=True)
        per_bin = bin_sum(onehot, size)  # (B, E)
        where = per_bin.nonzero()
        dropped_x, dropped_y = (where[:, 0] * size).numpy(), where[:, 1].numpy()
        dropped_n = per_bin[where[:, 0], where[:, 1]].numpy()
    if lt.dropped_count:
        fig.add_trace(
            plotly_trace(
                scatter(len(dropped_x)),
                x=dropped_x,
                y=dropped_y,
                mode="markers",
                name="dropped",
                marker={"symbol": "x", "size": 8, "color": DROPPED_COLOR, "line": {"width": 1, "color": "#000000"}},
                customdata=dropped_n,
                hovertemplate=(
                    "position %{x}: expert %{y} dropped"
                    if dropped_n is None
                    else "bin from %{x}: %{customdata} dropped at expert %{y}"
                )
                + "<extra></extra>",
            )
        )
    fig.update_layout(
        title={"text": f"Router probabilities, layer {layer} ({trace.policy})" + bin_note(size, T)},
        legend={"orientation": "h", "y": -0.25},
        plot_bgcolor="#FFFFFF",
    )
    token_axis(fig, trace, size)
    expert_axis(fig, E)

    h = metrics.router_entropy(lt)  # (T,)
    margin = metrics.topk_margin(lt)  # (T,)
    top = lt.router_probs.float().max(dim=-1)  # (T,)
    t_conf = int(top.values.argmax())
    fragile = int((margin < LOW_MARGIN).sum())
    if size > 1:  # the heatmap groups long prompts into bins and marks no individual choices
        opening = (
            f"Each column is a group of {size} consecutive tokens ({T} tokens in all), each row one of the {E} "
            "experts; brighter means a higher mean router probability (at this zoom single choices are not marked). "
        )
    elif k_applied < E:
        opening = (
            f"Each column is one of the {T} tokens, each row one of the {E} experts; brighter means a higher router "
            f"probability, and dots mark the {k_applied} experts each token is sent to. "
        )
    else:
        opening = (
            f"Each column is one of the {T} tokens, each row one of the {E} experts; brighter means a higher router "
            "probability; in ensemble mode every expert is used, so nothing is marked. "
        )
    text = (
        opening + f"The mean router entropy is {float(h.mean()):.2f} of its maximum (1 = undecided, 0 = certain). "
        f"The most confident token is {code_token(trace.tokens[t_conf])} (position {t_conf}), giving "
        f"{float(top.values[t_conf]):.2f} to expert {int(top.indices[t_conf])}. "
        f"{fragile} of {T} tokens have a top-{lt.top_k} margin below {LOW_MARGIN} — a small change to the "
        f"router would swap one of their experts."
    )
    if lt.dropped_count:
        if size == 1:
            text += f" Crosses mark the {len(dropped_x)} assignments dropped because their expert was full."
        else:
            text += (
                f" Crosses mark the {len(dropped_x)} (token group, expert) cells holding the {int(dropped_n.sum())} "
                "assignments dropped because their expert was full."
            )
    return View("routing_heatmap", f"Token × expert routing, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- coloured text
def coloured_text(trace: Trace, layer: int) -> View:
    """The traced text with each token's background in the colour of its first-choice expert
    (Mixtral paper style), a hover title with the token's router distribution, and a legend.
    Partially dropped tokens are underlined (dotted), fully dropped ones struck through."""
    lt = trace.layer(layer)
    E = lt.num_experts
    colors = expert_colors(E)
    first = metrics.first_choice(lt)  # (T,)
    top1 = first.tolist()
    probs = lt.router_probs.float()
    order = probs.argsort(dim=-1, descending=True)[:, :TITLE_EXPERTS].tolist()
    probs_l = probs.tolist()
    n_dropped = lt.dropped.sum(dim=1).tolist()
    kk = lt.index.shape[1]
    spans = []
    for t, tok in enumerate(trace.tokens):
        e = top1[t]
        shown = ", ".join(f"e{j} {probs_l[t][j]:.2f}" for j in order[t])
        if E > TITLE_EXPERTS:
            rest = sum(probs_l[t]) - sum(probs_l[t][j] for j in order[t])
            shown += f", others {rest:.2f}"
        title = f"#{t} {tok!r} → expert {e}; {shown}"
        if n_dropped[t]:
            title += f"; {n_dropped[t]} of {kk} assignments dropped"
        style = f"background:{colors[e]};color:{text_color(colors[e])}"
        if n_dropped[t] == kk:
            style += ";text-decoration:line-through"
        elif n_dropped[t]:
            style += ";text-decoration:underline dotted"
        text = html.escape(tok, quote=True).replace("\n", "↵<br>") or "∅"
        spans.append(f'<span class="moe-tok" style="{style}" title="{html.escape(title, quote=True)}">{text}</span>')
    legend = " ".join(
        f'<span style="background:{c};color:{text_color(c)};padding:0 4px;border-radius:3px">expert {i}</span>'
        for i, c in enumerate(colors)
    )
    body = (
        '<div class="moe-viz-text" style="font-family:monospace;white-space:pre-wrap;line-height:1.8">'
        + "".join(spans)
        + f'</div><div class="moe-viz-legend" style="margin-top:6px;font-size:0.85em">Top-1 expert at layer '
        f"{int(layer)} ({html.escape(trace.policy)}): {legend}</div>"
    )

    counts = first.bincount(minlength=E)
    e = int(counts.argmax())
    r = metrics.reuse(lt)
    explanation = (
        f"Each token is coloured by its first-choice expert in layer {layer}. Expert {e} is the most common "
        f"first choice ({int(counts[e])} of {lt.num_tokens} tokens)."
    )
    if r.pairs:
        explanation += (
            f" Neighbouring tokens keep the same first choice {pct(r.first_choice_same)} of the time; "
            f"random routing would give {pct(r.first_choice_baseline)}."
        )
    explanation += " Hover a token to see its full router distribution."
    title = f"The text, coloured by each token's first-choice expert (layer {layer})"
    return View("coloured_text", title, explanation, html=body)


# ----------------------------------------------------------------------------- one token
def router_distribution(trace: Trace, layer: int, position: int) -> View:
    """One token's router scores over experts (expert colours): the experts this run sent it to
    outlined, dropped ones hatched, the top-k margin in the title; the text names the same experts."""
    lt = trace.layer(layer)
    t = trace.check_position(position)
    E = lt.num_experts
    p = lt.router_probs[t].float()  # (E,)
    applied = lt.index[t].tolist()  # the experts this run sent the token to, in slot order
    every = len(applied) >= E  # ensemble: every expert runs
    chosen = set() if every else set(applied)
    dropped = set(lt.index[t][lt.dropped[t]].tolist())
    margin = float(metrics.topk_margin(lt)[t])
    status = ["dropped" if e in dropped else "chosen" if e in chosen or every else "not chosen" for e in range(E)]
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=list(range(E)),
            y=f32(p),
            customdata=status,
            marker={
                "color": expert_colors(E),
                "line": {"width": [3 if e in chosen else 0.5 for e in range(E)], "color": "#000000"},
                "pattern": {"shape": ["x" if e in dropped else "" for e in range(E)], "fgcolor": DROPPED_COLOR},
            },
            hovertemplate="expert %{x}: p = %{y:.3f} (%{customdata})<extra></extra>",
        )
    )
    fig.update_layout(
        title={
            "text": f"Router distribution of token {t} “{display_token(trace.tokens[t])}”, layer {layer} "
            f"(top-{lt.top_k} margin {margin:.3f})"
        },
        yaxis_title="router probability",
        plot_bgcolor="#FFFFFF",
    )
    expert_axis(fig, E, "x")

    total = max(float(p.sum()), 1e-12)
    if every:
        text = (
            f"Token {code_token(trace.tokens[t])} (position {t}) in layer {layer}: in this mode every one of the "
            f"{E} experts processes it, weighted by the router."
        )
    else:
        ranked = sorted(applied, key=lambda e: -float(p[e]))
        parts = ", ".join(f"expert {e} ({float(p[e]):.2f})" for e in ranked)
        mass = sum(float(p[e]) for e in ranked) / total
        text = (
            f"Token {code_token(trace.tokens[t])} (position {t}) in layer {layer} is sent to {len(ranked)} "
            f"expert{'s' if len(ranked) != 1 else ''}: {parts}, carrying {pct(mass)} of the router probability."
        )
        rest = [e for e in p.argsort(descending=True).tolist() if e not in chosen]
        if rest:
            best = rest[0]
            text += f" The best expert it was not sent to is {best} ({float(p[best]):.2f})."
    n_dropped = len(dropped)
    if n_dropped:
        whole = n_dropped == len(applied)
        text += (
            f" Capacity dropped {n_dropped} of its {len(applied)} assignments "
            f"(expert {', '.join(map(str, sorted(dropped)))})"
            + (
                "; it passes through on the residual path only."
                if whole
                else "; the kept weights are not renormalised."
            )
        )
    return View("router_distribution", "Router distribution of the selected token", text, figure=finish(fig))


def predictions(trace: Trace, position: int = -1, n: int = 10) -> View:
    """The ``n`` most likely next tokens after ``position`` (horizontal bars, most likely on top)."""
    t = trace.check_position(position)
    preds = trace.predictions(t, n)
    labels = [f"{i + 1}. {display_token(tok)}" for i, (tok, _) in enumerate(preds)]
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=[q for _, q in preds],
            y=labels,
            orientation="h",
            marker={"color": "#0072B2"},
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": f"Next token after “{display_token(trace.tokens[t])}” (position {t}, {trace.policy})"},
        xaxis_title="probability",
        plot_bgcolor="#FFFFFF",
        yaxis={"autorange": "reversed", "type": "category"},  # labels like "2. 9" must not become numbers
    )
    (tok, q), rest = preds[0], preds[1:3]
    text = f"After {code_token(trace.tokens[t])} (position {t}) the model predicts {code_token(tok)} with {pct(q)}"
    if rest:
        text += ", then " + ", ".join(f"{code_token(s)} {pct(w)}" for s, w in rest)
    text += f"; the prediction entropy is {float(trace.output.entropy[t]):.2f} nats."
    target = float(trace.output.target_logprob[t])
    if not math.isnan(target) and t + 1 < trace.num_tokens:
        text += f" The actual next token {code_token(trace.tokens[t + 1])} got {pct(math.exp(target))}."
    return View("predictions", "Next-token predictions after the selected token", text, figure=finish(fig))
