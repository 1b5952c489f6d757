"""Views of where tokens go: the token x expert heatmap, the text coloured by expert, one token's
router distribution and its next-token predictions.

Each function takes a trace and the view's arguments and returns a ``View`` whose figure and
explanation are built from the same numbers.
"""

from __future__ import annotations

import functools
import html
import math

import numpy as np
import plotly.graph_objects as go
import torch

from .. import metrics
from ..trace import LayerTrace, Trace
from ._display import bin_mean, bin_note, bin_sum, code_token, display_token, pct, plural, token_bins
from ._experts import (
    NEUTRAL,
    SHOWN_EXPERTS,
    ExpertFocus,
    category_axis,
    expert_focus,
    expert_rows_axis,
    focus_sentence,
    focused_rows,
    fold,
)
from ._plotly import (
    DROPPED_COLOR,
    KEPT_MARK_COLOR,
    SEQUENTIAL,
    FigureBuilder,
    expert_axis,
    f32,
    finish,
    plotly_trace,
    scatter,
    text_color,
    token_axis,
)
from ._view import View

SCORE_KIND = {"sigmoid": "sigmoid", "sqrtsoftplus": "sqrt-softplus"}  # routers whose scores are not probabilities
LOW_MARGIN = 0.05  # top-k margins below this count as fragile decisions
TITLE_EXPERTS = 16  # hover titles list at most this many experts, then the rest summed


def _applied_k(trace: Trace, layer: int) -> int:
    return trace.layer(layer).applied_k


def selection_rule(lt: LayerTrace) -> str:
    """How this router chooses beyond its scores ('' when the k highest scores are the choice)."""
    rules = [r for r, on in (("a selection bias", lt.selection_bias), ("a group limit", lt.group_limited)) if on]
    return " and ".join(rules)


def fragility_sentence(lt: LayerTrace) -> str:
    """How many tokens sit close to a different choice — only where a choice exists and the scores
    alone make it (no selection bias, no group limit), at this run's k."""
    if lt.every_expert_runs:
        return "Every expert runs, so no routing choice can flip."
    if lt.capture_only:
        return ""
    if not lt.scores_decide:
        return (
            f"This router chooses with {selection_rule(lt)}, so how close two scores are does not tell how close "
            "a choice was."
        )
    k = lt.applied_k
    margin = metrics.topk_margin(lt, k)  # (T,)
    fragile = int((margin < LOW_MARGIN).sum())
    return (
        f"{fragile} of {plural(lt.num_tokens, 'token')} have a top-{k} margin (last chosen minus first left-out "
        f"{lt.score_name}) below {LOW_MARGIN}: a small change to the router would swap one of their experts."
    )


# ----------------------------------------------------------------------------- token x expert heatmap
def _row_of(focus: ExpertFocus):  # noqa: ANN202 - (n,) expert ids -> their rows on the expert axis
    """Expert ids -> their row: the id itself when every expert has one, else its label or the
    "other experts" row it was folded into."""
    if not focus.folded:
        return lambda ids: ids.numpy()
    shown = set(focus.shown)
    return lambda ids: np.array([focus.label(e) if e in shown else focus.other_label for e in ids.tolist()])


def routing_heatmap(trace: Trace, layer: int, experts: list[int] | None = None) -> View:
    """Router probability per (expert, token); kept assignments marked with white dots, dropped
    ones with vermillion crosses. Long prompts show the mean probability per token bin and one
    cross per (bin, expert) with dropped assignments (hover: how many). Above 16 experts the
    busiest (or ``experts``) get a row each and the rest share one "other experts" row."""
    lt = trace.layer(layer)
    if not lt.scores_recorded:  # an engine import: which experts, not how strongly
        from .imported import routed_heatmap

        return routed_heatmap(trace, layer, experts)
    T, E = lt.num_tokens, lt.num_experts
    k_applied = _applied_k(trace, layer)
    size = token_bins(T)
    # many experts: the busiest on their own rows, the rest summed into one
    probs, rows, focus = focused_rows(bin_mean(lt.router_probs, size), lt, experts)  # (B, rows)
    x = np.arange(probs.shape[0]) * size if size > 1 else np.arange(T)
    fig = FigureBuilder(
        plotly_trace(
            go.Heatmap,
            z=f32(probs.t()),
            x=x,
            y=rows,
            colorscale=SEQUENTIAL,
            zmin=0.0,
            colorbar={"title": {"text": ("router " if size == 1 else "mean ") + lt.score_name}},
            hovertemplate=("position %{x}" if size == 1 else "bin from %{x}")
            + "<br>expert %{y}<br>p = %{z:.3f}<extra></extra>",
            name="router probability",
        )
    )
    pos = torch.arange(T).unsqueeze(1).expand_as(lt.index)  # (T, k')
    row_of = _row_of(focus)
    if size == 1:
        kept = ~lt.dropped
        if k_applied < E:  # ensemble: every expert is chosen, no markers needed
            fig.add_trace(
                plotly_trace(
                    scatter(int(kept.sum())),
                    x=pos[kept].numpy(),
                    y=row_of(lt.index[kept]),
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
        dropped_x, dropped_y, dropped_n = pos[lt.dropped].numpy(), row_of(lt.index[lt.dropped]), None
    else:
        onehot = torch.zeros(T, E, dtype=torch.long)
        ones = torch.ones(int(lt.dropped.sum()), dtype=torch.long)
        onehot.index_put_((pos[lt.dropped], lt.index[lt.dropped]), ones, accumulate=True)
        per_bin = bin_sum(onehot, size)  # (B, E)
        if focus.folded:
            per_bin, _ = fold(per_bin, focus)  # (B, S + 1)
        where = per_bin.nonzero()
        dropped_x = (where[:, 0] * size).numpy()
        dropped_y = np.asarray(rows)[where[:, 1].numpy()] if focus.folded else where[:, 1].numpy()
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
        title={
            "text": f"Router {lt.score_name} per token and expert, layer {layer} ({trace.policy})" + bin_note(size, T)
        },
        legend={"orientation": "h", "y": -0.25},
        plot_bgcolor="#FFFFFF",
    )
    token_axis(fig, trace, size)
    expert_rows_axis(fig, focus, rows)
    boundary = trace.prompt_length  # a generation: prompt tokens first, then the generated ones
    if 0 < boundary < T:
        fig.add_vline(
            boundary - 0.5 if size == 1 else boundary - size / 2,
            line={"color": "#D55E00", "width": 2, "dash": "dash"},
            annotation_text="generated →",
        )

    score = lt.score_name
    h = metrics.router_entropy(lt)  # (T,)
    top = lt.router_probs.float().max(dim=-1)  # (T,)
    t_conf = int(top.values.argmax())
    rows_text = f"the {plural(E, 'expert')}" if not focus.folded else "the experts"
    if size > 1:  # the heatmap groups long prompts into bins and marks no individual choices
        opening = (
            f"Each column is a group of {size} consecutive tokens ({T} tokens in all), each row one of the "
            f"{plural(E, 'expert')}; brighter means a higher mean router {score} (at this zoom single choices are "
            "not marked). "
        )
    elif not lt.every_expert_runs:
        sent = "the expert" if k_applied == 1 else f"the {k_applied} experts"
        opening = (
            f"Columns are the {plural(T, 'token')}, rows {rows_text}; brighter means a higher router "
            f"{score}, and dots mark {sent} each token is sent to in this run. "
        )
    else:
        opening = (
            f"Columns are the {plural(T, 'token')}, rows {rows_text}; brighter means a higher router "
            f"{score}. Every expert processes every token in this run, so no choice is marked. "
        )
    if focus.folded:
        opening += focus_sentence(focus, layer)
    renorm = " (scores renormalised to sum to 1)" if lt.score_name == "score" else ""
    text = (
        opening + f"The mean router entropy is {float(h.mean()):.2f} of its maximum{renorm} (1 = undecided, "
        f"0 = certain). The most confident token is {code_token(trace.tokens[t_conf])} (position {t_conf}), giving "
        f"{float(top.values[t_conf]):.2f} to expert {int(top.indices[t_conf])}. "
    )
    text += fragility_sentence(lt)
    if 0 < boundary < T:
        text += (
            f" The dashed line marks where the prompt ends: {plural(boundary, 'prompt token')} to its left, "
            f"{plural(T - boundary, 'generated token')} to its right."
        )
    if lt.dropped_count:
        if size == 1:
            text += f" Crosses mark the {plural(len(dropped_x), 'assignment')} dropped because their expert was full."
        else:
            text += (
                f" Crosses mark the {len(dropped_x)} (token group, expert) cells holding the "
                f"{plural(int(dropped_n.sum()), 'assignment')} dropped because their expert was full."
            )
    return View("routing_heatmap", f"Token × expert routing, layer {layer}", text, figure=finish(fig))


# ----------------------------------------------------------------------------- coloured text
def score_listings(experts: torch.Tensor, scores: torch.Tensor, exact_in_float32: bool) -> list[str]:
    """Each row's experts and scores as ``"e3 0.41, e0 0.22, ..."``, the scores written as ``"%.2f"``
    writes them; ``experts`` (T, n) ids, ``scores`` (T, n) float64.

    Formatting every score in Python costs a microsecond each (a 2,048-token prompt of a 16-expert
    model has 32,768). When the scores are float32 values (``exact_in_float32``), score x 100 is
    exact in float64 (24 + 7 significant bits), so rounding it half to even gives the very digits
    ``"%.2f"`` prints; each distinct (expert, digits) label is then written once."""
    if scores.numel() == 0:
        return [""] * len(scores)
    hundredths = torch.round(scores * 100)  # (T, n)
    if not exact_in_float32 or not bool(torch.isfinite(hundredths).all()) or float(hundredths.min()) < 0:
        listing = ", ".join(["e%d %.2f"] * experts.shape[1])
        pairs = torch.stack([experts.double(), scores], dim=2).reshape(len(experts), -1).tolist()  # (T, 2n)
        return [listing % tuple(row) for row in pairs]
    k = hundredths.long()  # (T, n)
    highest = int(k.max())
    if highest < PROBABILITY_SPAN:  # probabilities: every label "e3 0.41" of these experts, written once a process
        codes = experts.long() * PROBABILITY_SPAN + k  # (T, n) one integer per (expert, score digits)
        # for ids up to the next power of two: one table serves every prompt of a model
        label = _probability_labels(1 << int(experts.max()).bit_length()).__getitem__
    else:  # scores above 1: each distinct label written once
        span = highest + 1
        codes = experts.long() * span + k  # (T, n)
        label = {c: f"e{c // span} {_hundredths_text(c % span)}" for c in codes.unique().tolist()}.__getitem__
    return [", ".join(map(label, row)) for row in codes.tolist()]


PROBABILITY_SPAN = 101  # hundredths 0 to 100: the digits of a score from 0.00 to 1.00


def _hundredths_text(hundredths: int) -> str:
    """``"%.2f"`` of ``hundredths / 100``, written from the integer (``7`` -> ``"0.07"``)."""
    return f"{hundredths // 100}.{hundredths % 100:02d}"


@functools.lru_cache(maxsize=8)
def _probability_labels(num_experts: int) -> tuple[str, ...]:
    """``"e{j} {k / 100:.2f}"`` at index ``j * PROBABILITY_SPAN + k``, for experts below ``num_experts``."""
    digits = [_hundredths_text(k) for k in range(PROBABILITY_SPAN)]
    return tuple(f"e{j} {d}" for j in range(num_experts) for d in digits)


def coloured_text(trace: Trace, layer: int) -> View:
    """The traced text with each token's background in the colour of its first-choice expert
    (Mixtral paper style), a hover title with the token's router distribution, and a legend.
    Partially dropped tokens are underlined (dotted), fully dropped ones struck through."""
    lt = trace.layer(layer)
    E = lt.num_experts
    focus = expert_focus(lt)  # above 16 experts: colours for the commonest first choices only
    colors = focus.colors()
    first = metrics.first_choice(lt)  # (T,)
    top1 = first.tolist()
    scores = lt.scores_recorded
    n_dropped = lt.dropped.sum(dim=1).tolist()
    kk = lt.index.shape[1]
    if scores:  # each title lists the token's TITLE_EXPERTS highest scores ("e3 0.41, e0 0.22, ..."), then the rest
        probs = lt.router_probs.double()  # (T, E)
        n = min(E, TITLE_EXPERTS)
        top_p, top_e = probs.sort(dim=-1, descending=True, stable=True)  # (T, E): ties keep the lower id first
        top_p, top_e = top_p[:, :n], top_e[:, :n]  # (T, n)
        shown_all = score_listings(top_e, top_p, exact_in_float32=lt.router_probs.dtype != torch.float64)
        if E > TITLE_EXPERTS:
            rest = (probs.sum(dim=-1) - top_p.sum(dim=-1)).tolist()  # (T,)
            shown_all = [f"{shown}, others {r:.2f}" for shown, r in zip(shown_all, rest, strict=True)]
    else:  # an engine import: the experts in the engine's order, no scores
        shown_all = ["experts " + " ".join(f"e{j}" for j in row) for row in lt.index.tolist()]
    styles = [f"background:{c};color:{text_color(c)}" for c in colors]
    escaped: dict[str, tuple[str, str]] = {}  # token -> (its text, its repr for the title), escaped once
    spans = []
    for t, tok in enumerate(trace.tokens):
        if tok not in escaped:
            text = html.escape(tok, quote=True).replace("\n", "↵<br>") or "∅"
            escaped[tok] = (text, html.escape(repr(tok), quote=True))
        text, tok_repr = escaped[tok]
        e = top1[t]
        title = f"#{t} {tok_repr} → expert {e}; {shown_all[t]}"  # the listing holds no markup characters
        style = styles[e]
        if n_dropped[t]:
            title += f"; {n_dropped[t]} of {kk} assignments dropped"
            style += ";text-decoration:line-through" if n_dropped[t] == kk else ";text-decoration:underline dotted"
        spans.append(f'<span class="moe-tok" style="{style}" title="{title}">{text}</span>')
    chip = '<span style="background:{c};color:{t};padding:0 4px;border-radius:3px;white-space:nowrap">{label}</span>'
    legend = " ".join(
        chip.format(c=focus.color(e), t=text_color(focus.color(e)), label=f"expert {e}") for e in focus.coloured
    )
    if len(focus.coloured) < E:  # the neutral colour stands for every other expert
        others = E - len(focus.coloured)
        legend += " " + chip.format(c=NEUTRAL, t=text_color(NEUTRAL), label=f"the other {others} experts")
    # The key comes first: a long text scrolls in its box, and the key must stay in view.
    body = (
        f'<div class="moe-viz-legend" style="margin-bottom:6px;font-size:0.85em">Top-1 expert at layer '
        f"{int(layer)} ({html.escape(trace.policy)}): {legend}</div>"
        '<div class="moe-viz-text" style="font-family:monospace;white-space:pre-wrap;line-height:1.8">'
        + "".join(spans)
        + "</div>"
    )

    counts = first.bincount(minlength=E)
    e = int(counts.argmax())
    r = metrics.reuse(lt)
    rule = (
        "the highest-scoring expert it was sent to"
        if scores
        else "the first expert the engine listed for it: engines list a token's experts highest score first"
    )
    explanation = (
        f"Each token is coloured by its first-choice expert in layer {layer} ({rule}). Expert {e} is the most common "
        f"first choice ({int(counts[e])} of {plural(lt.num_tokens, 'token')})."
    )
    if r.pairs:
        explanation += (
            f" Neighbouring tokens keep the same first choice {pct(r.first_choice_same)} of the time; "
            f"random routing would give {pct(r.first_choice_baseline)}."
        )
    if len(focus.coloured) < E:
        explanation += (
            f" With {E} experts, only the {len(focus.coloured)} commonest first choices of this layer get a colour of "
            "their own; the others share the grey."
        )
    explanation += (
        " Hover a token to see its full router distribution." if scores else " Hover a token to see all its experts."
    )
    title = f"The text, coloured by each token's first-choice expert (layer {layer})"
    return View("coloured_text", title, explanation, html=body)


# ----------------------------------------------------------------------------- one token
def router_distribution(trace: Trace, layer: int, position: int) -> View:
    """One token's router scores over experts (expert colours): the experts this run sent it to
    outlined, dropped ones hatched; the text names exactly the same experts."""
    lt = trace.layer(layer)
    metrics.check_scores(lt, "a token's router distribution")
    t = trace.check_position(position)
    E = lt.num_experts
    p = lt.router_probs[t].float()  # (E,)
    applied = lt.index[t].tolist()  # the experts this run sent the token to, in slot order
    every = lt.every_expert_runs
    chosen = set() if every else set(applied)
    dropped = set(lt.index[t][lt.dropped[t]].tolist())
    status = ["dropped" if e in dropped else "chosen" if e in chosen or every else "not chosen" for e in range(E)]
    margin_note = ""
    if not every and lt.scores_decide:
        margin_note = f" (top-{lt.applied_k} margin {float(metrics.topk_margin(lt, lt.applied_k)[t]):.3f})"
    focus = expert_focus(lt)
    bars = list(range(E))  # up to 16 experts: every one, by id
    if focus.folded:  # many experts: this token's highest scores (its experts among them), then the rest summed
        top = [e for e in p.argsort(descending=True).tolist()][: max(SHOWN_EXPERTS, len(chosen))]
        bars = sorted(set(top) | chosen, key=lambda e: -float(p[e]))
    x = [f"e{e}" for e in bars] if focus.folded else bars
    y = [float(p[e]) for e in bars]
    if focus.folded:
        x.append(f"other {E - len(bars)} experts")
        y.append(float(p.sum()) - sum(y))
    fig = FigureBuilder(
        plotly_trace(
            go.Bar,
            x=x,
            y=np.asarray(y, dtype=np.float32),
            customdata=[status[e] for e in bars] + (["summed"] if focus.folded else []),
            marker={
                "color": [focus.color(e) for e in bars] + ([NEUTRAL] if focus.folded else []),
                "line": {
                    "width": [3 if e in chosen else 0.5 for e in bars] + [0.5] * bool(focus.folded),
                    "color": "#000000",
                },
                "pattern": {
                    "shape": ["x" if e in dropped else "" for e in bars] + [""] * bool(focus.folded),
                    "fgcolor": DROPPED_COLOR,
                },
            },
            hovertemplate=("%{x}" if focus.folded else "expert %{x}") + ": %{y:.3f} (%{customdata})<extra></extra>",
        )
    )
    fig.update_layout(
        title={
            "text": f"Router {'scores' if lt.router_family == 'sigmoid' else 'probabilities'} of token {t} “{display_token(trace.tokens[t])}”, layer {layer}"
            + margin_note
        },
        yaxis_title=f"router {lt.score_name}",
        plot_bgcolor="#FFFFFF",
    )
    if focus.folded:
        category_axis(fig, x, f"expert: this token's {len(bars)} highest scores, then the other {E - len(bars)}", "x")
    else:
        expert_axis(fig, E, "x")

    token = f"Token {code_token(trace.tokens[t])} (position {t}) in layer {layer}"
    if every:
        text = f"{token}: every one of the {plural(E, 'expert')} processes it in this run, weighted by the router."
    else:
        ranked = sorted(applied, key=lambda e: -float(p[e]))
        parts = ", ".join(f"expert {e} ({float(p[e]):.2f})" for e in ranked)
        text = f"{token} is sent to {plural(len(ranked), 'expert')}: {parts}"
        if lt.score_name == "score":
            text += f"; their {SCORE_KIND.get(lt.router_family, lt.router_family)} scores sum to {sum(float(p[e]) for e in ranked):.2f} (scores need not sum to 1)."
        else:
            mass = sum(float(p[e]) for e in ranked) / max(float(p.sum()), 1e-12)
            text += f", carrying {pct(mass)} of the router probability."
        rest = [e for e in p.argsort(descending=True).tolist() if e not in chosen]
        if rest:
            best = rest[0]
            text += f" The highest-scoring expert it was not sent to is {best} ({float(p[best]):.2f})"
            if lt.scores_decide:
                text += "."
            else:
                text += f"; this router also uses {selection_rule(lt)}, so a higher score alone does not win a slot."
    if dropped:
        lost = ", ".join(map(str, sorted(dropped)))
        if len(dropped) == len(applied):
            carried = "the residual path and the shared expert" if lt.shared_expert else "the residual path alone"
            text += f" Capacity dropped all its assignments (expert {lost}): {carried} carries it past this layer."
        else:
            kept = ", ".join(str(e) for e in applied if e not in dropped)
            text += (
                f" Capacity dropped {len(dropped)} of its {len(applied)} assignments (expert {lost}); it keeps expert "
                f"{kept}, whose weight is not renormalised."
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
    row = trace.output.at(t)
    text += f"; the prediction entropy is {float(row.entropy[0]):.2f} nats."
    target = float(row.target_logprob[0])
    if not math.isnan(target) and t + 1 < trace.num_tokens:
        text += f" The actual next token {code_token(trace.tokens[t + 1])} got {pct(math.exp(target))}."
    return View("predictions", "Next-token predictions after the selected token", text, figure=finish(fig))
