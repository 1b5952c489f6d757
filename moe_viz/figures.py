"""Plotly figures of a trace. Every function returns a ``go.Figure`` (or an HTML string) and never
renders; pages decide how to show them.

* Expert ``e`` has the same colour in every chart: ``expert_colors(E)[e]`` (Okabe-Ito up to 8
  experts, then Paul Tol's muted palette, then spread samples of viridis).
* Continuous scales are colour-blind safe (cividis); dropped assignments are vermillion crosses.
* Long prompts stay interactive: above ``BIN_THRESHOLD`` tokens the token axis is aggregated into at
  most ``MAX_BINS`` bins (the title says so), big heatmaps carry no per-cell text, and long line
  charts use WebGL (``Scattergl``). Token text is untrusted and is HTML-escaped everywhere.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from . import metrics
from .trace import Trace

BIN_THRESHOLD = 512  # tokens above which token axes are aggregated into bins
MAX_BINS = 256
WEBGL_THRESHOLD = 1000  # points above which scatter traces use WebGL
CELL_TEXT_LIMIT = 300  # heatmaps with more cells carry no per-cell text
TICK_TEXT_LIMIT = 64  # tokens up to which the token axis shows the token text

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
TOL_MUTED = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499", "#DDDDDD"]  # fmt: skip
SEQUENTIAL = "Cividis"
DROPPED_COLOR = "#D55E00"  # vermillion
KEPT_MARK_COLOR = "#FFFFFF"
FLIP_COLOR = "#D55E00"


# ----------------------------------------------------------------------------- colours and helpers
def expert_colors(num_experts: int) -> list[str]:
    """One colour-blind-safe colour per expert, the same for an expert in every chart.

    Up to 8: Okabe-Ito; up to 18: plus Tol's muted; more: viridis samples in a strided order so
    that neighbouring expert ids get distant colours (beyond 18 colours cannot all be told apart)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1; got {num_experts!r}")
    base = OKABE_ITO + TOL_MUTED
    if num_experts <= len(base):
        return base[:num_experts]
    from plotly.colors import sample_colorscale

    samples = sample_colorscale("Viridis", [i / (num_experts - 1) for i in range(num_experts)], colortype="rgb")
    stride = next(s for s in range(int(math.sqrt(num_experts)) or 1, num_experts + 1) if math.gcd(s, num_experts) == 1)
    order = [(i * stride) % num_experts for i in range(num_experts)]
    return [_rgb_to_hex(samples[j]) for j in order]


def _rgb_to_hex(rgb: str) -> str:
    parts = [int(round(float(v))) for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    return "#{:02X}{:02X}{:02X}".format(*parts)


def _text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (#RRGGBB)."""
    r, g, b = (int(background[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#FFFFFF"


def display_token(token: str) -> str:
    """A token as visible, HTML-escaped text: spaces as '␣', newlines as '↵', tabs as '⇥'."""
    shown = token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    # quote=False: plotly's SVG text decodes &amp; &lt; &gt; but shows &quot; literally
    return html.escape(shown or "∅", quote=False)


def token_bins(num_tokens: int) -> int:
    """Tokens per bin on token axes: 1 up to ``BIN_THRESHOLD`` tokens, else enough for ``MAX_BINS``."""
    return 1 if num_tokens <= BIN_THRESHOLD else math.ceil(num_tokens / MAX_BINS)


def _bin_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over consecutive groups of ``size`` rows of (T, ...) -> (ceil(T/size), ...)."""
    if size == 1:
        return x
    T = x.shape[0]
    n = math.ceil(T / size)
    pad = n * size - T
    xs = torch.cat([x.double(), torch.zeros((pad, *x.shape[1:]), dtype=torch.float64)])
    sums = xs.reshape(n, size, *x.shape[1:]).sum(dim=1)
    counts = torch.full((n,), float(size), dtype=torch.float64)
    counts[-1] = size - pad
    return sums / counts.reshape(n, *([1] * (x.dim() - 1)))


def _bin_sum(x: torch.Tensor, size: int) -> torch.Tensor:
    if size == 1:
        return x
    T = x.shape[0]
    n = math.ceil(T / size)
    xs = torch.cat([x, torch.zeros((n * size - T, *x.shape[1:]), dtype=x.dtype)])
    return xs.reshape(n, size, *x.shape[1:]).sum(dim=1)


VALIDATE = False  # plotly property validation: off for speed (about 2x); tests switch it on


def _merge(target: dict[str, Any], updates: dict[str, Any]) -> None:
    """Deep-merge ``updates`` into ``target`` (plotly's update semantics for nested dicts)."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _expand(props: dict[str, Any]) -> dict[str, Any]:
    """Plotly's "magic underscore" names we use (``title_text``, ``xaxis_title``) as nested dicts."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key == "title_text":
            _merge(out, {"title": {"text": value}})
        elif key in ("xaxis_title", "yaxis_title"):
            _merge(out, {key.split("_")[0]: {"title": {"text": value}}})
        else:
            _merge(out, {key: value})
    return out


class _Figure:
    """Collects a single-panel figure as plain dicts and builds the ``go.Figure`` once at the end.

    It offers the few ``go.Figure`` methods our figures use. Every ``update_*`` call on a real
    ``go.Figure`` walks plotly's property tree (about 5 ms a figure here); building from one dict
    costs a fraction of that, which keeps a page's figures cheap next to the model's forward.
    """

    def __init__(self, data: Any = None) -> None:
        self.data: list[Any] = [] if data is None else [data]
        self.layout: dict[str, Any] = {}

    def add_trace(self, trace: Any, row: int | None = None, col: int | None = None) -> None:
        self.data.append(trace)

    def update_layout(self, props: dict[str, Any] | None = None, **kwargs: Any) -> None:
        _merge(self.layout, _expand({**(props or {}), **kwargs}))

    def update_xaxes(self, row: int | None = None, col: int | None = None, **kwargs: Any) -> None:
        _merge(self.layout, {"xaxis": _expand(kwargs)})

    def update_yaxes(self, row: int | None = None, col: int | None = None, **kwargs: Any) -> None:
        _merge(self.layout, {"yaxis": _expand(kwargs)})

    def add_hline(
        self,
        y: float,
        line: dict[str, Any] | None = None,
        annotation_text: str | None = None,
        annotation_position: str = "top right",
        row: int | None = None,
        col: int | None = None,
    ) -> None:
        """A horizontal line across the plot, with an optional label at its left or right end."""
        shape = {"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y}
        self.layout.setdefault("shapes", []).append({**shape, "line": line or {}})
        if annotation_text is not None:
            right = annotation_position.endswith("right")
            self.layout.setdefault("annotations", []).append(
                {"text": annotation_text, "showarrow": False, "xref": "x domain", "x": 1 if right else 0,
                 "xanchor": "right" if right else "left", "yref": "y", "y": y, "yanchor": "bottom"}
            )  # fmt: skip


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def _finish(fig: _Figure | go.Figure, width: int = 72) -> go.Figure:
    """The finished ``go.Figure``; a long title wraps onto several lines so that it is not cut
    off in a half-width column."""
    if isinstance(fig, go.Figure):
        text = fig.layout.title.text
        if text and len(text) > width and "<br>" not in text:
            lines = _wrap(text, width)
            fig.update_layout(title={"text": "<br>".join(lines), "font": {"size": 13}}, margin={"t": 40 + 18 * len(lines)})
        return fig
    text = fig.layout.get("title", {}).get("text")
    if text and len(text) > width and "<br>" not in text:
        lines = _wrap(text, width)
        _merge(fig.layout, {"title": {"text": "<br>".join(lines), "font": {"size": 13}}, "margin": {"t": 40 + 18 * len(lines)}})
    return go.Figure({"data": fig.data, "layout": fig.layout}, _validate=VALIDATE)


def _figure(data: object = None) -> _Figure:
    return _Figure(data)


def _trace(cls: type, **kwargs: object) -> dict[str, Any]:
    """A plotly trace as a dict (``go.Heatmap`` -> ``{"type": "heatmap", ...}``); ``go.Figure``
    validates it when ``VALIDATE`` is on."""
    return {"type": cls.__name__.lower(), **kwargs}


def _check_position(trace: Trace, position: int) -> int:
    T = trace.num_tokens
    if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
        raise ValueError(f"position must be an integer with {-T} <= position < {T}; got {position!r}")
    return position % T


def _token_axis(fig: go.Figure, trace: Trace, size: int, row: int | None = None, col: int | None = None) -> None:
    """Token x-axis: token text as ticks for short prompts, positions (or bin starts) otherwise."""
    kwargs = {} if row is None else {"row": row, "col": col}
    T = trace.num_tokens
    if size == 1 and T <= TICK_TEXT_LIMIT:
        fig.update_xaxes(
            tickmode="array", tickvals=list(range(T)), ticktext=[display_token(t) for t in trace.tokens],
            tickangle=-60, title_text="token", **kwargs,
        )  # fmt: skip
    else:
        title = "token position" if size == 1 else f"token position (bins of {size})"
        fig.update_xaxes(title_text=title, **kwargs)


def _bin_note(size: int, T: int) -> str:
    return "" if size == 1 else f" — {T} tokens aggregated into {math.ceil(T / size)} bins of {size}"


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).numpy()


def _scatter(n_points: int) -> type:
    return go.Scattergl if n_points > WEBGL_THRESHOLD else go.Scatter


def _expert_axis(fig: go.Figure, E: int, axis: str = "y") -> None:
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    if E <= 32:
        update(tickmode="array", tickvals=list(range(E)), ticktext=[str(e) for e in range(E)], title_text="expert")
    else:
        update(title_text="expert")


# ----------------------------------------------------------------------------- routing of one layer
def token_expert_heatmap(trace: Trace, layer: int) -> go.Figure:
    """Router probability per (expert, token); kept assignments marked with white dots, dropped
    ones with vermillion crosses. Long prompts show the mean probability per token bin and one
    cross per (bin, expert) with dropped assignments (hover: how many)."""
    lt = trace.layer(layer)
    T, E = lt.num_tokens, lt.num_experts
    size = token_bins(T)
    probs = _bin_mean(lt.router_probs, size)  # (B, E)
    nb = probs.shape[0]
    x = np.arange(nb) * size if size > 1 else np.arange(T)
    fig = _figure(
        _trace(
                go.Heatmap,
            z=_f32(probs.t()), x=x, y=np.arange(E), colorscale=SEQUENTIAL, zmin=0.0,
            colorbar={"title": {"text": "router p" if size == 1 else "mean p"}},
            hovertemplate=("position %{x}" if size == 1 else "bin from %{x}")
            + "<br>expert %{y}<br>p = %{z:.3f}<extra></extra>",
            name="router probability",
        )  # fmt: skip
    )
    pos = torch.arange(T).unsqueeze(1).expand_as(lt.index)  # (T, k')
    if size == 1:
        kept = ~lt.dropped
        if lt.index.shape[1] < E:  # ensemble: every expert is chosen, no markers needed
            n = int(kept.sum())
            fig.add_trace(
                _trace(
                    _scatter(n),
                    x=pos[kept].numpy(), y=lt.index[kept].numpy(), mode="markers", name="chosen",
                    marker={"symbol": "circle", "size": 5, "color": KEPT_MARK_COLOR, "line": {"width": 1, "color": "#000000"}},
                    hovertemplate="position %{x}: expert %{y} chosen<extra></extra>",
                )  # fmt: skip
            )
        dropped_x, dropped_y, dropped_n = pos[lt.dropped].numpy(), lt.index[lt.dropped].numpy(), None
    else:
        onehot = torch.zeros(T, E, dtype=torch.long)
        onehot.index_put_((pos[lt.dropped], lt.index[lt.dropped]), torch.ones(int(lt.dropped.sum()), dtype=torch.long), accumulate=True)
        per_bin = _bin_sum(onehot, size)  # (B, E)
        where = per_bin.nonzero()
        dropped_x, dropped_y = (where[:, 0] * size).numpy(), where[:, 1].numpy()
        dropped_n = per_bin[where[:, 0], where[:, 1]].numpy()
    if lt.dropped_count:
        fig.add_trace(
            _trace(
                    _scatter(len(dropped_x)),
                x=dropped_x, y=dropped_y, mode="markers", name="dropped",
                marker={"symbol": "x", "size": 8, "color": DROPPED_COLOR, "line": {"width": 1, "color": "#000000"}},
                customdata=dropped_n,
                hovertemplate=("position %{x}: expert %{y} dropped" if dropped_n is None
                               else "bin from %{x}: %{customdata} dropped at expert %{y}") + "<extra></extra>",
            )  # fmt: skip
        )
    title = f"Router probabilities, layer {layer} ({trace.policy})" + _bin_note(size, T)
    fig.update_layout(title={"text": title}, legend={"orientation": "h", "y": -0.25}, plot_bgcolor="#FFFFFF")
    _token_axis(fig, trace, size)
    _expert_axis(fig, E)
    return _finish(fig)


def expert_load_bars(trace: Trace, layer: int) -> go.Figure:
    """Kept assignments per expert (expert colours) with dropped ones stacked on top (hatched),
    the fair-share line (assignments / E) and, under a capacity policy, the capacity line."""
    lt = trace.layer(layer)
    b = metrics.balance(lt)
    E = lt.num_experts
    colors = expert_colors(E)
    experts = list(range(E))
    fig = _figure(
        _trace(
                go.Bar,
            x=experts, y=b.load.numpy(), marker={"color": colors, "line": {"width": 0.5, "color": "#333333"}},
            name="kept", hovertemplate="expert %{x}: %{y} kept<extra></extra>",
        )  # fmt: skip
    )
    dropped = (b.routed - b.load).numpy()
    if b.dropped:
        fig.add_trace(
            _trace(
                go.Bar,
                x=experts, y=dropped, name="dropped",
                marker={"color": "rgba(255,255,255,0.6)", "pattern": {"shape": "x", "fgcolor": DROPPED_COLOR},
                        "line": {"width": 1, "color": DROPPED_COLOR}},
                hovertemplate="expert %{x}: %{y} dropped<extra></extra>",
            )  # fmt: skip
        )
    fig.add_hline(y=b.fair_share, line={"dash": "dash", "color": "#000000"},
                  annotation_text=f"fair share {b.fair_share:.1f}", annotation_position="top left")  # fmt: skip
    if b.capacity:
        cap = max(b.capacity)
        fig.add_hline(y=cap, line={"dash": "dot", "color": DROPPED_COLOR},
                      annotation_text=f"capacity {cap}", annotation_position="top right")  # fmt: skip
    fig.update_layout(
        barmode="stack", title={"text": f"Expert load, layer {layer} ({trace.policy}): {b.assignments} assignments"},
        yaxis_title="assignments", showlegend=bool(b.dropped), plot_bgcolor="#FFFFFF",
    )  # fmt: skip
    _expert_axis(fig, E, "x")
    return _finish(fig)


def layer_load_heatmap(trace: Trace, which: metrics.SetKind = "routed") -> go.Figure:
    """Layer x expert load relative to the fair share (1 = fair, 0 = unused); hover gives counts."""
    loads = metrics.layer_loads(trace, which)  # (L, E)
    L, E = loads.shape
    fair = loads.double().sum(dim=1, keepdim=True) / max(E, 1)  # (L, 1)
    rel = loads.double() / fair.clamp_min(1e-12)  # (L, E)
    text = loads.numpy().astype(str) if L * E <= CELL_TEXT_LIMIT else None
    fig = _figure(
        _trace(
                go.Heatmap,
            z=_f32(rel), x=np.arange(E), y=[str(i) for i in trace.layer_ids], colorscale=SEQUENTIAL, zmin=0.0,
            customdata=loads.numpy(), text=text, texttemplate="%{text}" if text is not None else None,
            colorbar={"title": {"text": "load / fair"}},
            hovertemplate="layer %{y}, expert %{x}<br>%{customdata} assignments<br>%{z:.2f}× fair share<extra></extra>",
        )  # fmt: skip
    )
    label = {"routed": "routed (kept + dropped)", "kept": "kept", "native": "native top-k"}[which]
    fig.update_layout(title={"text": f"Load per layer and expert, {label}, relative to fair share ({trace.policy})"})
    fig.update_yaxes(title_text="layer", type="category")
    _expert_axis(fig, E, "x")
    return _finish(fig)


def router_distribution(trace: Trace, layer: int, position: int) -> go.Figure:
    """One token's router probabilities over experts (expert colours); chosen experts outlined,
    dropped ones hatched, the k-th / (k+1)-th gap (top-k margin) in the title."""
    lt = trace.layer(layer)
    t = _check_position(trace, position)
    E = lt.num_experts
    p = lt.router_probs[t]  # (E,)
    chosen = set(lt.index[t].tolist()) if lt.index.shape[1] < E else set()
    dropped = set(lt.index[t][lt.dropped[t]].tolist())
    line_w = [3 if e in chosen else 0.5 for e in range(E)]
    patterns = ["x" if e in dropped else "" for e in range(E)]
    status = ["dropped" if e in dropped else "chosen" if e in chosen else "not chosen" for e in range(E)]
    margin = float(metrics.topk_margin(lt)[t])
    fig = _figure(
        _trace(
                go.Bar,
            x=list(range(E)), y=_f32(p), customdata=status,
            marker={"color": expert_colors(E), "line": {"width": line_w, "color": "#000000"},
                    "pattern": {"shape": patterns, "fgcolor": DROPPED_COLOR}},
            hovertemplate="expert %{x}: p = %{y:.3f} (%{customdata})<extra></extra>",
        )  # fmt: skip
    )
    fig.update_layout(
        title={"text": f"Router distribution of token {t} “{display_token(trace.tokens[t])}”, layer {layer} "
                       f"(top-{lt.top_k} margin {margin:.3f})"},
        yaxis_title="router probability", plot_bgcolor="#FFFFFF",
    )  # fmt: skip
    _expert_axis(fig, E, "x")
    return _finish(fig)


def predictions_bar(trace: Trace, position: int = -1, n: int = 10) -> go.Figure:
    """The ``n`` most likely next tokens after ``position`` (horizontal bars, most likely on top)."""
    t = _check_position(trace, position)
    preds = trace.predictions(t, n)
    labels = [f"{i + 1}. {display_token(tok)}" for i, (tok, _) in enumerate(preds)]
    fig = _figure(
        _trace(
                go.Bar,
            x=[p for _, p in preds], y=labels, orientation="h", marker={"color": "#0072B2"},
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )  # fmt: skip
    )
    fig.update_layout(
        title={"text": f"Next token after “{display_token(trace.tokens[t])}” (position {t}, {trace.policy})"},
        xaxis_title="probability", plot_bgcolor="#FFFFFF",
        yaxis={"autorange": "reversed", "type": "category"},  # labels like "2. 9" must not become numbers
    )  # fmt: skip
    return _finish(fig)


def coactivation_heatmap(trace: Trace, layer: int, which: metrics.SetKind = "routed") -> go.Figure:
    """A[a, b] = share of a's tokens that also went to b (rows: a); the independence baseline
    (k-1)/(E-1) is in the title; the diagonal is blank."""
    lt = trace.layer(layer)
    co = metrics.coactivation(lt, which)
    E = lt.num_experts
    text = None
    if E * E <= CELL_TEXT_LIMIT:
        text = [["" if math.isnan(v) else f"{v:.2f}" for v in row] for row in co.matrix.tolist()]
    fig = _figure(
        _trace(
                go.Heatmap,
            z=_f32(co.matrix), x=np.arange(E), y=np.arange(E), colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
            customdata=co.counts.numpy(), text=text, texttemplate="%{text}" if text is not None else None,
            colorbar={"title": {"text": "P(b | a)"}},
            hovertemplate="expert %{y} → %{x}: %{z:.2f} (%{customdata} tokens)<extra></extra>",
        )  # fmt: skip
    )
    fig.update_layout(
        title={"text": f"Co-activation, layer {layer}: share of expert a's tokens also sent to b "
                       f"(independent routing: {co.baseline:.2f})"}
    )  # fmt: skip
    _expert_axis(fig, E, "x")
    _expert_axis(fig, E, "y")
    fig.update_xaxes(title_text="expert b")
    fig.update_yaxes(title_text="expert a", autorange="reversed")
    return _finish(fig)


# ----------------------------------------------------------------------------- comparing two runs
def mode_effect_figure(reference: Trace, other: Trace) -> go.Figure:
    """Top: KL(reference || other) per position with top-1 flips marked; bottom: change in
    log-prob of the actual next token (other - reference). WebGL for long prompts."""
    e = metrics.mode_effect(reference, other)
    T = reference.num_tokens
    pos = np.arange(T)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("KL(reference ‖ other), nats", "Δ log p(actual next token)"))  # fmt: skip
    line = _scatter(T)
    fig.add_trace(_trace(line, x=pos, y=_f32(e.kl), mode="lines", name="KL", line={"color": "#0072B2"},
                       hovertemplate="position %{x}: KL %{y:.4f}<extra></extra>"), row=1, col=1)  # fmt: skip
    flips = np.asarray(e.flipped_positions, dtype=np.int64)
    fig.add_trace(
        _trace(
                    _scatter(len(flips)),
            x=flips, y=_f32(e.kl[flips]) if len(flips) else np.zeros(0, dtype=np.float32), mode="markers",
            name="top-1 flip", marker={"symbol": "x", "size": 9, "color": FLIP_COLOR},
            hovertemplate="position %{x}: top-1 prediction changed<extra></extra>",
        ),
        row=1, col=1,
    )  # fmt: skip
    fig.add_trace(_trace(line, x=pos, y=_f32(e.delta_logprob), mode="lines", name="Δ log p", line={"color": "#009E73"},
                       hovertemplate="position %{x}: Δ %{y:.3f}<extra></extra>"), row=2, col=1)  # fmt: skip
    fig.add_hline(y=0, line={"color": "#999999", "width": 1}, row=2, col=1)
    fig.update_layout(
        title={"text": f"Effect of {other.policy} against {reference.policy}: mean KL {e.mean_kl:.4f}, "
                       f"top-1 flips {len(e.flipped_positions)}/{T} ({e.flip_rate:.0%})"
                       + (" — WebGL" if T > WEBGL_THRESHOLD else "")},
        legend={"orientation": "h", "y": -0.15}, plot_bgcolor="#FFFFFF",
    )  # fmt: skip
    _token_axis(fig, reference, 1, row=2, col=1)
    return _finish(fig)


DIFF_LABELS = ("neither", "both", "reference only", "other only")
DIFF_COLORS = ("#F2F2F2", "#999999", "#E69F00", "#0072B2")


def routing_diff_heatmap(reference: Trace, other: Trace, layer: int) -> go.Figure:
    """Expert x token map of which run sent the token to the expert (kept assignments): both,
    reference only, other only; other's dropped assignments as crosses. Long prompts show, per
    token bin, the share of tokens whose membership at that expert differs."""
    d = metrics.routing_diff(reference, other, layer)
    T, E = d.reference_sets.shape
    size = token_bins(T)
    if size == 1:
        code = d.reference_sets.long() * 1 + d.other_sets.long() * 3  # 0, 1, 3, 4
        code = torch.tensor([0, 2, 0, 3, 1])[code]  # neither 0, both 1, ref only 2, other only 3
        n = len(DIFF_COLORS)
        scale = []
        for i, c in enumerate(DIFF_COLORS):
            scale += [[i / n, c], [(i + 1) / n, c]]
        fig = _figure(
            _trace(
                go.Heatmap,
                z=code.t().numpy().astype(np.int8), x=np.arange(T), y=np.arange(E), colorscale=scale,
                zmin=-0.5, zmax=n - 0.5,
                colorbar={"tickvals": list(range(n)), "ticktext": list(DIFF_LABELS), "title": {"text": ""}},
                hovertemplate="position %{x}, expert %{y}: %{z}<extra></extra>",
            )  # fmt: skip
        )
        oth = other.layer(layer)
        pos = torch.arange(T).unsqueeze(1).expand_as(oth.index)
        if oth.dropped_count:
            fig.add_trace(
                _trace(
                    _scatter(oth.dropped_count),
                    x=pos[oth.dropped].numpy(), y=oth.index[oth.dropped].numpy(), mode="markers",
                    name=f"dropped in {other.policy}",
                    marker={"symbol": "x", "size": 8, "color": DROPPED_COLOR, "line": {"width": 1, "color": "#000000"}},
                    hovertemplate="position %{x}: expert %{y} dropped<extra></extra>",
                )  # fmt: skip
            )
    else:
        differs = (d.reference_sets != d.other_sets).double()  # (T, E)
        share = _bin_mean(differs, size)  # (B, E)
        fig = _figure(
            _trace(
                go.Heatmap,
                z=_f32(share.t()), x=np.arange(share.shape[0]) * size, y=np.arange(E), colorscale=SEQUENTIAL,
                zmin=0.0, zmax=1.0, colorbar={"title": {"text": "share changed"}},
                hovertemplate="bin from %{x}, expert %{y}: %{z:.2f} of tokens changed<extra></extra>",
            )  # fmt: skip
        )
    fig.update_layout(
        title={"text": f"Routing difference at layer {layer}: {reference.policy} (reference) vs {other.policy}; "
                       f"{d.num_changed}/{T} tokens changed" + _bin_note(size, T)},
        legend={"orientation": "h", "y": -0.25}, plot_bgcolor="#FFFFFF",
    )  # fmt: skip
    _token_axis(fig, reference, size)
    _expert_axis(fig, E)
    return _finish(fig)


# ----------------------------------------------------------------------------- coloured text
TITLE_EXPERTS = 16  # hover titles list at most this many experts, then the rest summed


def first_choice(trace: Trace, layer: int) -> torch.Tensor:
    """(T,) each token's top-1 expert: the highest router probability among its routed experts."""
    lt = trace.layer(layer)
    sets = metrics.membership(lt, "routed")  # (T, E)
    return lt.router_probs.float().masked_fill(~sets, -1.0).argmax(dim=-1)


def token_text_html(trace: Trace, layer: int) -> str:
    """The traced text with each token's background in the colour of its top-1 expert
    (Mixtral paper style), a hover title with the token's router distribution, and a legend.
    Partially dropped tokens are underlined (dotted), fully dropped ones struck through.
    Token text is HTML-escaped."""
    lt = trace.layer(layer)
    E = lt.num_experts
    colors = expert_colors(E)
    top1 = first_choice(trace, layer).tolist()
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
        style = f"background:{colors[e]};color:{_text_color(colors[e])}"
        if n_dropped[t] == kk:
            style += ";text-decoration:line-through"
        elif n_dropped[t]:
            style += ";text-decoration:underline dotted"
        text = html.escape(tok, quote=True).replace("\n", "↵<br>") or "∅"
        spans.append(f'<span class="moe-tok" style="{style}" title="{html.escape(title, quote=True)}">{text}</span>')
    legend = " ".join(
        f'<span style="background:{c};color:{_text_color(c)};padding:0 4px;border-radius:3px">expert {i}</span>'
        for i, c in enumerate(colors)
    )
    return (
        '<div class="moe-viz-text" style="font-family:monospace;white-space:pre-wrap;line-height:1.8">'
        + "".join(spans)
        + f'</div><div class="moe-viz-legend" style="margin-top:6px;font-size:0.85em">Top-1 expert at layer '
        f"{int(layer)} ({html.escape(trace.policy)}): {legend}</div>"
    )
