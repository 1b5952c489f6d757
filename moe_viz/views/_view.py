"""``View``: one chart (or table, or HTML text) with its title and its explanation, made together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class View:
    """A finished view of a trace (or a pair of traces).

    Exactly one of ``figure`` (a plotly ``go.Figure``), ``html`` (an HTML fragment whose token text
    is escaped) and ``table`` (a DataFrame) holds the picture; ``explanation`` is Markdown that
    cites the numbers the picture shows, computed from the same statistics. ``name`` is a stable
    identifier (widget keys, file names); ``title`` is the heading a page shows above it.
    """

    name: str
    title: str
    explanation: str
    figure: Any = None
    html: str | None = None
    table: pd.DataFrame | None = None

    def __post_init__(self) -> None:
        shown = [x is not None for x in (self.figure, self.html, self.table)]
        if sum(shown) != 1:
            raise ValueError(f"a View holds exactly one of figure, html, table; {self.name!r} holds {sum(shown)}")
