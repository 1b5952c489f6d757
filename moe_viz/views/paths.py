"""Expert paths across layers: a Sankey of first-choice experts from layer to layer, the most
frequent paths against the independence baseline, and how concentrated the paths are."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from .. import metrics
from ..trace import Trace
from ._display import code_token, pct, plural
from ._experts import MANY_EXPERTS, NEUTRAL
from ._plotly import FigureBuilder, expert_colors, finish, plotly_trace
from ._view import View


def _scope(trace: Trace, p: metrics.Paths) -> str:
    T = len(p.positions)
    if T == trace.num_tokens:
        return plural(T, "token")
    if T == 1:
        return f"token {code_token(trace.tokens[p.positions[0]])} (position {p.positions[0]})"
    return f"{plural(T, 'chosen token')} of {trace.num_tokens}"


def expert_paths(trace: Trace, top: int = 5, positions: list[int] | None = None) -> View:
    """Sankey: one column of nodes per MoE layer (its experts), links = tokens whose first choice
    goes from expert a in one layer to expert b in the next (all tokens, or those at
    ``positions``); the text cites the commonest path."""
    all_layers = len(trace.layers)
    p = metrics.expert_paths(sampled_layers(trace), top=top, positions=positions)
    L = len(p.layers)
    E = p.marginals.shape[1]
    many = E > MANY_EXPERTS
    colors = expert_colors(E) if not many else [NEUTRAL] * E  # many experts: identity in the labels only
    # Each column's nodes: every expert (up to 16), else its PATH_EXPERTS commonest first choices and one
    # "other" node; node id = (column, expert) with expert E standing for "other".
    paths = p.paths  # (T, L) first choices
    if many:  # an expert without a node of its own joins its column's "other" node (E)
        kept = [_column_experts(paths[:, c], E) for c in range(L)]
        node_of = torch.full((L, E + 1), E, dtype=torch.long)  # (L, E+1): expert -> the node's expert
        for c, experts in enumerate(kept):
            node_of[c, experts] = torch.tensor(experts, dtype=torch.long)
        paths = node_of.gather(1, paths.T).T  # (T, L)
    column_nodes = [[*experts, E] for experts in kept] if many else [list(range(E))] * L
    nodes: dict[tuple[int, int], int] = {}
    labels, node_colors = [], []
    for c, experts in enumerate(column_nodes):
        layer = p.layers[c]
        for e in experts:
            nodes[(c, e)] = len(labels)
            labels.append(f"L{layer} · e{e}" if e < E else f"L{layer} · other")
            node_colors.append(colors[e] if e < E else NEUTRAL)
    source, target, value = [], [], []
    for c in range(L - 1):
        # tokens per (a, b) node pair, in (a, b) order: one bincount over pair ids a * (E + 1) + b
        pairs = torch.bincount(paths[:, c] * (E + 1) + paths[:, c + 1], minlength=(E + 1) ** 2)  # ((E+1)^2,)
        present = pairs.nonzero().squeeze(1)  # (P,) pair ids with tokens, ascending
        for pair, n in zip(present.tolist(), pairs[present].tolist(), strict=True):
            a, b = divmod(pair, E + 1)
            source.append(nodes[(c, a)])
            target.append(nodes[(c + 1, b)])
            value.append(n)
    fig = FigureBuilder(
        plotly_trace(
            go.Sankey,
            arrangement="snap",
            node={"label": labels, "color": node_colors, "pad": 8, "thickness": 12},
            link={"source": np.array(source), "target": np.array(target), "value": np.array(value)},
        )
    )
    shown = "" if L == all_layers else f" ({L} evenly spaced of {all_layers})"
    fig.update_layout(
        title={"text": f"First-choice expert paths across {plural(L, 'MoE layer')}{shown} ({trace.policy})"}
    )
    path, tokens, share, indep = p.top[0]
    route = route_text(path)
    if len(p.positions) == 1:
        text = (
            f"Each column is one MoE layer. {_scope(trace, p)[0].upper()}{_scope(trace, p)[1:]} takes the path "
            f"{route}: its first-choice expert in each layer. Choose several tokens (a pattern) to see how the "
            "paths concentrate against the independence baseline."
        )
        return View("expert_paths", "Expert paths across layers", text, figure=finish(fig))
    text = (
        f"Each column is one MoE layer, each band the tokens whose first-choice expert goes from one expert to "
        f"another in the next layer. The commonest path, {route}, carries {tokens} of {_scope(trace, p)} "
        f"({pct(share)}); if every layer chose independently (the product of its per-layer shares) it would carry "
        f"{pct(indep)}. The layers share {p.total_correlation:.2f} nats of information (total correlation: the "
        f"sum of per-layer entropies {p.independent_entropy:.2f} minus the path entropy {p.path_entropy:.2f}; "
        "0 = independent layers)."
    )
    if L < all_layers:
        text += (
            f" With {all_layers} layers, paths and numbers use {L} evenly spaced ones (layers "
            f"{', '.join(map(str, p.layers))}): over every layer nearly each token's path would be its own."
        )
    if many:
        text += (
            f" With {E} experts each column shows its {PATH_EXPERTS} commonest first choices and one grey node for "
            "the rest; the numbers count every expert."
        )
    return View("expert_paths", "Expert paths across layers", text, figure=finish(fig))


def route_text(path: tuple[int, ...] | list[int]) -> str:
    """'e3 → e1 → e7' up to 8 layers; longer paths keep their first three and last two experts."""
    steps = [f"e{e}" for e in path]
    if len(steps) <= 8:
        return " → ".join(steps)
    return " → ".join(steps[:3]) + " → … → " + " → ".join(steps[-2:]) + f" ({len(steps)} layers)"


MAX_COLUMNS = 8  # layers a path spans: more are sampled evenly (first and last kept)
PATH_EXPERTS = 8  # nodes per column above MANY_EXPERTS experts, besides "other"


def sampled_layers(trace: Trace) -> Trace:
    """``trace`` with at most MAX_COLUMNS of its MoE layers, evenly spaced, first and last kept:
    paths across dozens of layers are all different, across a few they can be compared."""
    L = len(trace.layers)
    if L <= MAX_COLUMNS:
        return trace
    keep = sorted({round(i * (L - 1) / (MAX_COLUMNS - 1)) for i in range(MAX_COLUMNS)})
    return replace(trace, layers=[trace.layers[i] for i in keep])


def _column_experts(first_choices: torch.Tensor, E: int) -> list[int]:
    """The experts of one column that get their own node: the commonest first choices (ties: lower id)."""
    counts = torch.bincount(first_choices, minlength=E).tolist()  # (E,)
    return [e for e in sorted(range(E), key=lambda e: -counts[e]) if counts[e] > 0][:PATH_EXPERTS]


def paths_table(trace: Trace, top: int = 10, positions: list[int] | None = None) -> View:
    """The most frequent first-choice paths: tokens, share, the share if layers chose independently
    (product of per-layer marginals over the same tokens) and the ratio of the two."""
    p = metrics.expert_paths(sampled_layers(trace), top=top, positions=positions)
    rows = [
        {
            "path": " → ".join(f"e{e}" for e in path),
            "tokens": tokens,
            "share": share,
            "if independent": indep,
            "× independent": share / indep if indep > 0 else float("inf"),
        }
        for path, tokens, share, indep in p.top
    ]
    table = pd.DataFrame(rows, columns=["path", "tokens", "share", "if independent", "× independent"])
    first = rows[0]
    text = (
        f"The {len(rows)} commonest first-choice paths over {_scope(trace, p)}. The top one, "
        f"{route_text(p.top[0][0])}, is "
        f"taken {first['× independent']:.3g}× as often as if each layer chose independently "
        f"({pct(first['share'])} against {pct(first['if independent'])}). {len(set(map(tuple, p.paths.tolist())))} "
        f"distinct paths in all; total correlation {p.total_correlation:.2f} nats (0 = independent layers)."
    )
    if len(p.layers) < len(trace.layers):
        text += f" Paths span {len(p.layers)} evenly spaced of the {len(trace.layers)} layers: {', '.join(map(str, p.layers))}."
    return View("paths_table", "Most frequent expert paths", text, table=table)
