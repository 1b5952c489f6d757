"""Expert paths across layers: a Sankey of first-choice experts from layer to layer, the most
frequent paths against the independence baseline, and how concentrated the paths are."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from .. import metrics
from ..trace import Trace
from ._display import code_token, pct, plural
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
    p = metrics.expert_paths(trace, top=top, positions=positions)
    L = len(p.layers)
    E = p.marginals.shape[1]
    colors = expert_colors(E)
    labels = [f"L{layer} · e{e}" for layer in p.layers for e in range(E)]
    source, target, value = [], [], []
    for i in range(L - 1):
        pairs: dict[tuple[int, int], int] = {}
        for a, b in p.paths[:, i : i + 2].tolist():
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
        for (a, b), n in sorted(pairs.items()):
            source.append(i * E + a)
            target.append((i + 1) * E + b)
            value.append(n)
    fig = FigureBuilder(
        plotly_trace(
            go.Sankey,
            arrangement="snap",
            node={"label": labels, "color": [colors[j % E] for j in range(L * E)], "pad": 8, "thickness": 12},
            link={"source": source, "target": target, "value": value},
        )
    )
    fig.update_layout(title={"text": f"First-choice expert paths across {plural(L, 'MoE layer')} ({trace.policy})"})
    path, tokens, share, indep = p.top[0]
    route = " → ".join(f"e{e}" for e in path)
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
    return View("expert_paths", "Expert paths across layers", text, figure=finish(fig))


def paths_table(trace: Trace, top: int = 10, positions: list[int] | None = None) -> View:
    """The most frequent first-choice paths: tokens, share, the share if layers chose independently
    (product of per-layer marginals over the same tokens) and the ratio of the two."""
    p = metrics.expert_paths(trace, top=top, positions=positions)
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
        f"The {len(rows)} commonest first-choice paths over {_scope(trace, p)}. The top one, {first['path']}, is "
        f"taken {first['× independent']:.3g}× as often as if each layer chose independently "
        f"({pct(first['share'])} against {pct(first['if independent'])}). {len(set(map(tuple, p.paths.tolist())))} "
        f"distinct paths in all; total correlation {p.total_correlation:.2f} nats (0 = independent layers)."
    )
    return View("paths_table", "Most frequent expert paths", text, table=table)
