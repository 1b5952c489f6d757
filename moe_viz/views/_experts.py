"""Expert axes and colours that stay readable from 8 to hundreds of experts.

Up to ``MANY_EXPERTS`` experts every view draws every expert, in id order, each in its own
colour (``expert_colors``): the default model's views are unchanged. Above it, a view of one layer
draws the experts that matter most there and folds the rest into one "other experts" row:

* ``ExpertFocus.ranking``: every expert, busiest first (assignments in the layer, then id);
* ``shown``: the ``SHOWN_EXPERTS`` busiest, or a set the user chose, in ranking order;
* ``palette``: a distinct colour only for the ``COLOURED_EXPERTS`` most common first choices of
  the layer, the rest one neutral grey. Every view of a page computes the focus from the same
  trace and layer, so an expert keeps its colour across the page.

``chart_height`` sizes a chart to the rows it shows, up to a cap (the chart then scrolls or zooms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import metrics
from ..trace import LayerTrace
from ._plotly import OKABE_ITO, expert_axis, expert_colors

MANY_EXPERTS = 16  # above this, expert axes focus on the busiest experts and fold the rest
SHOWN_EXPERTS = 24  # experts an axis shows on their own row by default above MANY_EXPERTS
COLOURED_EXPERTS = 12  # experts with a colour of their own above MANY_EXPERTS
NEUTRAL = "#C8C8C8"  # every other expert
ROW_PX = 16  # chart height per row of experts or layers
MIN_HEIGHT = 320
MAX_HEIGHT = 900  # past this a chart keeps its height and its rows get thinner (zoom to read them)
# Twelve colours told apart: Okabe-Ito without black, then Tol's muted colours unlike any of those
# (no cyan beside sky blue, no second green, no sand beside yellow, no grey).
FOCUS_COLORS = [c for c in OKABE_ITO if c != "#000000"] + ["#CC6677", "#332288", "#882255", "#999933", "#AA4499"]


@dataclass(frozen=True)
class ExpertFocus:
    """Which experts a view of one layer draws, in what order, and in what colour."""

    num_experts: int
    ranking: tuple[int, ...]  # every expert, busiest first
    shown: tuple[int, ...]  # drawn on their own row, in axis order
    palette: dict[int, str]  # experts with a colour of their own
    basis: str  # what the order is by, for the axis title

    @property
    def folded(self) -> tuple[int, ...]:
        """The experts drawn together as "other experts" (empty up to MANY_EXPERTS)."""
        shown = set(self.shown)
        return tuple(e for e in self.ranking if e not in shown)

    @property
    def coloured(self) -> list[int]:
        """The experts with a colour of their own, most common first choice first."""
        return list(self.palette)

    def color(self, expert: int) -> str:
        return self.palette.get(expert, NEUTRAL)

    def colors(self) -> list[str]:
        """The colour of every expert, by id."""
        return [self.color(e) for e in range(self.num_experts)]

    def label(self, expert: int) -> str:
        return f"e{expert}"

    @property
    def other_label(self) -> str:
        return f"other {len(self.folded)} experts"

    def axis_title(self) -> str:
        if not self.folded:
            return "expert" if self.basis == "id" else f"expert (ordered by {self.basis})"
        return f"expert: the {len(self.shown)} {self.basis_phrase}, then the other {len(self.folded)}"

    @property
    def basis_phrase(self) -> str:
        return "chosen" if self.basis == "your choice" else f"busiest ({self.basis})"


def busiest_first(values, n: int | None = None) -> list[int]:  # noqa: ANN001 - a tensor, array or list
    """Indices of ``values`` from the largest down, ties to the lower index (the expert order every
    folded axis states); the first ``n`` of them when ``n`` is given."""
    v = [float(x) for x in (values.tolist() if hasattr(values, "tolist") else values)]
    order = sorted(range(len(v)), key=lambda i: (-v[i], i))
    return order if n is None else order[:n]


def expert_focus(lt: LayerTrace, top: int | None = None, chosen: Sequence[int] | None = None) -> ExpertFocus:
    """The focus of a view of layer ``lt``: up to MANY_EXPERTS experts, all of them in id order
    with ``expert_colors``; above it the ``top`` (default SHOWN_EXPERTS) busiest, or ``chosen``."""
    E = lt.num_experts
    if E <= MANY_EXPERTS and chosen is None:
        return ExpertFocus(E, tuple(range(E)), tuple(range(E)), dict(enumerate(expert_colors(E))), "id")
    ranking = tuple(busiest_first(metrics.expert_load(lt, "routed")))  # busiest, then lowest id
    if chosen is not None:
        bad = [e for e in chosen if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E]
        if bad or not chosen:
            raise ValueError(f"chosen experts must be a non-empty list of ids 0..{E - 1}; got {list(chosen)!r}")
        keep = set(chosen)
        shown = tuple(e for e in ranking if e in keep)
        basis = "your choice"
    else:
        n = SHOWN_EXPERTS if top is None else top
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"top must be an integer >= 1; got {top!r}")
        shown, basis = ranking[:n], "load"
    if lt.first_choice_known:
        firsts = torch.bincount(metrics.first_choice(lt), minlength=E)  # (E,)
        coloured = [e for e in busiest_first(firsts, COLOURED_EXPERTS) if firsts[e] > 0]
    else:
        coloured = list(ranking[:COLOURED_EXPERTS])
    palette = {e: FOCUS_COLORS[i % len(FOCUS_COLORS)] for i, e in enumerate(coloured)}
    return ExpertFocus(E, ranking, shown, palette, basis)


def chart_height(rows: int, extra: int = 160) -> int:
    """Pixels for a chart of ``rows`` rows of experts or layers: grows with them, within the caps."""
    return int(min(MAX_HEIGHT, max(MIN_HEIGHT, rows * ROW_PX + extra)))


def fold(x: torch.Tensor, focus: ExpertFocus, how: str = "sum") -> tuple[torch.Tensor, list[str]]:
    """(..., E) -> (..., S [+ 1]): the shown experts' columns in axis order, then the folded ones
    summed (or averaged, ``how="mean"``) into one "other experts" column; with the axis labels."""
    shown = list(focus.shown)
    parts = [x[..., shown]]  # (..., S)
    labels = [focus.label(e) for e in shown]
    if focus.folded:
        rest = x[..., list(focus.folded)]  # (..., F)
        parts.append((rest.sum(dim=-1) if how == "sum" else rest.double().mean(dim=-1).to(x.dtype)).unsqueeze(-1))
        labels.append(focus.other_label)
    return torch.cat(parts, dim=-1), labels


def category_axis(fig, labels: list[str], title: str, axis: str = "y", reverse: bool = False) -> None:  # noqa: ANN001
    """An expert axis of labelled categories (e.g. 'e17', 'other 232 experts'), every label shown."""
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    props = {"type": "category", "tickmode": "array", "tickvals": labels, "ticktext": labels, "title_text": title}
    if reverse:
        props["autorange"] = "reversed"
    update(**props)


def focus_sentence(focus: ExpertFocus, layer: int) -> str:
    """What a folded expert axis shows, for the explanation beside it."""
    who = (
        f"the {len(focus.shown)} experts you chose"
        if focus.basis == "your choice"
        else f"the {len(focus.shown)} busiest experts of layer {layer}, busiest first"
    )
    return (
        f"With {focus.num_experts} experts, the chart gives {who} a row each and sums the other "
        f"{len(focus.folded)} into one row; hover a cell for the exact expert and value. "
    )


def focused_rows(x: torch.Tensor, lt: LayerTrace, experts: Sequence[int] | None = None):  # noqa: ANN201
    """(B, E) -> the matrix a token x expert heatmap draws, its row labels and the focus: every
    expert by id up to MANY_EXPERTS, else the busiest (or ``experts``) and one folded row."""
    focus = expert_focus(lt, chosen=experts)
    if focus.folded:
        folded, rows = fold(x, focus)  # (B, S + 1)
        return folded, rows, focus
    return x, list(range(lt.num_experts)), focus


def expert_rows_axis(fig, focus: ExpertFocus, rows: list) -> None:  # noqa: ANN001 - a FigureBuilder
    """The expert axis of a token x expert heatmap: labelled, ordered and sized when folded."""
    if focus.folded:
        category_axis(fig, list(rows), focus.axis_title(), reverse=True)
        fig.update_layout(height=chart_height(len(rows)))
    else:
        expert_axis(fig, focus.num_experts)
