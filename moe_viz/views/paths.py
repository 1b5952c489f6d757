"""Expert paths across layers: a Sankey of first-choice experts from layer to layer, the most
frequent paths against the independence baseline, and how concentrated the paths are."""

from __future__ import annotations

import plotly.graph_objects as go

from .. import metrics
from ..trace import Trace
from ._display import pct, plural
from ._plotly import FigureBuilder, expert_colors, finish, plotly_trace
from ._view import View


def expert_paths(trace: Trace, top: int = 5) -> View:
    """Sankey: one column of nodes per MoE layer (its experts), links = tokens whose first choice
    goes from expert a in one layer to expert b in the next; the text cites the commonest path."""
    p = metrics.expert_paths(trace, top=top)
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
    T = trace.num_tokens
    text = (
        f"Each column is one MoE layer, each band the tokens whose first-choice expert goes from one expert to "
        f"another in the next layer. The commonest path, {route}, carries {tokens} of {plural(T, 'token')} "
        f"({pct(share)}); if every layer chose independently (the product of its per-layer shares) it would carry "
        f"{pct(indep)}. The layers share {p.total_correlation:.2f} nats of information (total correlation: the "
        f"sum of per-layer entropies {p.independent_entropy:.2f} minus the path entropy {p.path_entropy:.2f}; "
        "0 = independent layers)."
    )
    return View("expert_paths", "Expert paths across layers", text, figure=finish(fig))
