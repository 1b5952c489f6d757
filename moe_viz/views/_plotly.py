"""Plotly plumbing shared by the views: expert colours, a fast figure builder, token and expert axes.

* Expert ``e`` has the same colour in every chart: ``expert_colors(E)[e]`` (Okabe-Ito up to 8
  experts, then Paul Tol's muted palette, then spread samples of viridis).
* Continuous scales are colour-blind safe (cividis); dropped assignments are vermillion crosses.
* Long line charts use WebGL (``Scattergl``); big heatmaps carry no per-cell text.
* Numeric arrays go into a figure as plotly.js typed arrays, the form its JSON takes anyway
  (``array_values`` reads one back).
"""

from __future__ import annotations

import base64
import functools
import math
import threading
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from _plotly_utils.basevalidators import is_homogeneous_array
from _plotly_utils.utils import to_typed_array_spec

from ..trace import Trace
from ._display import display_token

WEBGL_THRESHOLD = 1000  # points above which scatter traces use WebGL
CELL_TEXT_LIMIT = 300  # heatmaps with more cells carry no per-cell text
TICK_TEXT_LIMIT = 64  # tokens up to which the token axis shows the token text

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
TOL_MUTED = [
    "#CC6677",
    "#332288",
    "#DDCC77",
    "#117733",
    "#88CCEE",
    "#882255",
    "#44AA99",
    "#999933",
    "#AA4499",
    "#DDDDDD",
]
SEQUENTIAL = "Cividis"
DROPPED_COLOR = "#D55E00"  # vermillion
KEPT_MARK_COLOR = "#FFFFFF"
FLIP_COLOR = "#D55E00"
LABEL_BACKGROUND = "rgba(255,255,255,0.8)"  # behind a reference line's label


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
    return [rgb_to_hex(samples[j]) for j in order]


def rgb_to_hex(rgb: str) -> str:
    parts = [int(round(float(v))) for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    return "#{:02X}{:02X}{:02X}".format(*parts)


@functools.lru_cache(maxsize=1024)  # a handful of expert colours, asked for once per token
def text_color(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (#RRGGBB)."""
    r, g, b = (int(background[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#FFFFFF"


VALIDATE = False  # plotly property validation: off for speed (about 2x); tests switch it on

# What our charts draw: 2-D cartesian traces and a Sankey. A template's defaults for other kinds
# (maps, polar, ternary and 3-D scenes, pies, contours...) only add weight.
CHART_TYPES = ("bar", "heatmap", "sankey", "scatter", "scattergl", "table")
OTHER_LAYOUT_KINDS = ("geo", "mapbox", "map", "polar", "scene", "ternary", "smith")
_compact_templates: dict[tuple[str | None, tuple[str, ...]], dict[str, Any]] = {}


def _without_colorscale(trace_defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in trace_defaults.items() if k != "colorscale"}


def compact_template(trace_types: tuple[str, ...] = CHART_TYPES) -> dict[str, Any]:
    """Plotly's default template (``plotly.io.templates.default``, "plotly" unless the user set
    another) cut to the parts a chart of ``trace_types`` uses.

    The full "plotly" template is about 7 KB of nested lists that plotly deep-copies when it builds
    a figure and walks again when it writes the JSON: nine tenths of a small chart's build and
    serialise time, and of the bytes the browser receives. The cut keeps the page layout, the axes
    and the defaults of the chart's own trace types (a template's defaults for a trace type apply
    to traces of that type only), so a chart looks the same in a notebook; in the app Streamlit's
    theme is drawn over it as before. The layout's colour axis goes too: no chart of ours uses one
    (every heatmap names its own colour scale)."""
    default = pio.templates.default
    name = default if isinstance(default, str) else None
    key = (name, trace_types)
    if name is not None and key in _compact_templates:
        return _compact_templates[key]
    full = pio.templates[default] if name is not None else default
    full = full.to_plotly_json() if full is not None else {}
    layout = {k: v for k, v in full.get("layout", {}).items() if k not in OTHER_LAYOUT_KINDS}
    layout.pop("colorscale", None)  # sequential/diverging defaults: every chart names its own scale
    layout.pop("coloraxis", None)  # a shared colour axis (plotly express's): our heatmaps carry their own
    # every heatmap names its own colour scale: the template's (a 10-stop list) is never used
    data = {k: [_without_colorscale(t) for t in v] for k, v in full.get("data", {}).items() if k in trace_types}
    template = {"data": data, "layout": layout}  # both keys: Streamlit's theme writes into them
    if name is not None:
        _compact_templates[key] = template
    return template


def _trace_types(data: list[Any]) -> tuple[str, ...]:
    """The sorted trace types of a figure's traces (dicts or plotly trace objects)."""
    return tuple(sorted({t["type"] if isinstance(t, dict) else t.type for t in data}))


def merge(target: dict[str, Any], updates: dict[str, Any]) -> None:
    """Deep-merge ``updates`` into ``target`` (plotly's update semantics for nested dicts)."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def expand(props: dict[str, Any]) -> dict[str, Any]:
    """Plotly's "magic underscore" names we use (``title_text``, ``xaxis_title``) as nested dicts."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key == "title_text":
            merge(out, {"title": {"text": value}})
        elif key in ("xaxis_title", "yaxis_title"):
            merge(out, {key.split("_")[0]: {"title": {"text": value}}})
        else:
            merge(out, {key: value})
    return out


class FigureBuilder:
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
        merge(self.layout, expand({**(props or {}), **kwargs}))

    def update_xaxes(self, row: int | None = None, col: int | None = None, **kwargs: Any) -> None:
        merge(self.layout, {"xaxis": expand(kwargs)})

    def update_yaxes(self, row: int | None = None, col: int | None = None, **kwargs: Any) -> None:
        merge(self.layout, {"yaxis": expand(kwargs)})

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
                {
                    "text": annotation_text,
                    "showarrow": False,
                    "xref": "x domain",
                    "x": 1 if right else 0,
                    "xanchor": "right" if right else "left",
                    "yref": "y",
                    "y": y,
                    "yanchor": "bottom",
                    "bgcolor": LABEL_BACKGROUND,  # readable where the line crosses a bar
                }
            )

    def add_vline(self, x: float, line: dict[str, Any] | None = None, annotation_text: str | None = None) -> None:
        """A vertical line from the bottom to the top of the plot, with an optional label at its top."""
        shape = {"type": "line", "yref": "y domain", "y0": 0, "y1": 1, "xref": "x", "x0": x, "x1": x}
        self.layout.setdefault("shapes", []).append({**shape, "line": line or {}})
        if annotation_text is not None:
            self.layout.setdefault("annotations", []).append(
                {
                    "text": annotation_text,
                    "showarrow": False,
                    "xref": "x",
                    "x": x,
                    "xanchor": "left",
                    "yref": "y domain",
                    "y": 1,
                    "yanchor": "bottom",
                    "bgcolor": LABEL_BACKGROUND,
                }
            )


def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line]


def finish(fig: FigureBuilder | go.Figure, width: int = 72) -> go.Figure:
    """The finished ``go.Figure``; a long title wraps onto several lines so that it is not cut
    off in a half-width column."""
    if isinstance(fig, go.Figure):
        text = fig.layout.title.text
        if text and len(text) > width and "<br>" not in text:
            lines = wrap(text, width)
            fig.update_layout(
                title={"text": "<br>".join(lines), "font": {"size": 13}}, margin={"t": 40 + 18 * len(lines)}
            )
        fig.layout.template = compact_template(_trace_types(fig.data))  # subplots were built with the full one
        return fig
    text = fig.layout.get("title", {}).get("text")
    if text and len(text) > width and "<br>" not in text:
        lines = wrap(text, width)
        merge(
            fig.layout,
            {"title": {"text": "<br>".join(lines), "font": {"size": 13}}, "margin": {"t": 40 + 18 * len(lines)}},
        )
    # the template is plotly's own JSON (no None, no arrays): only the layout needs ``_plain``
    layout = {"template": compact_template(_trace_types(fig.data)), **_plain(fig.layout)}
    data = [_plain(trace) for trace in fig.data]  # arrays serialised once, here
    if VALIDATE:  # tests: plotly checks every property name and value
        return go.Figure({"data": data, "layout": layout})
    return LazyFigure({"data": data, "layout": layout})


class LazyFigure(go.Figure):
    """A ``go.Figure`` kept as its finished dict until something asks for more than the dict.

    A page needs only the dict: ``st.plotly_chart`` calls ``to_dict`` and writes the result as
    JSON. Building plotly's object tree (about 0.3 ms a chart here) and walking it back in
    ``to_dict`` (0.17 ms) is most of a small chart's cost, so ``to_dict`` here copies the dict. Any
    other use (``fig.data``, ``fig.layout``, ``update_layout``, ``to_html``...) first builds the
    figure from a copy of the dict, unvalidated, exactly as ``go.Figure(spec, _validate=False)``
    would, and from then on it is that figure.

    * Threads: the build holds the figure's lock, and while it runs the figure is a
      ``_FigureBeingBuilt``, whose attribute lookups from any other thread wait for the build: no
      thread sees a half-built figure, and ``to_dict`` never copies a dict plotly is reading.
    * Streamlit (``st.write``) and other libraries recognise a plotly figure by its type's module
      and name, so the class answers to plotly's own (``plotly.graph_objs._figure.Figure``).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        # no go.Figure.__init__ yet: plotly's state is built on first use (``__getattr__``); ``spec``
        # is already what plotly's ``to_dict`` would return (``finish`` made it ``_plain``)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "_builder", None)  # the thread building the figure, while it does

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes the object lacks: before the build, all of plotly's state.
        state = self.__dict__
        if name.startswith("__") or "_lock" not in state or state["_builder"] == threading.get_ident():
            raise AttributeError(name)  # not plotly state, or asked for by the build itself
        with state["_lock"]:
            if "_spec" in state:  # not built by another thread while this one waited
                _build(self)
        return object.__getattribute__(self, name)

    def to_dict(self) -> dict[str, Any]:
        with self.__dict__["_lock"]:
            spec = self.__dict__.get("_spec")
            if spec is not None:
                return _copy_json(spec)
        return super().to_dict()  # built: changes made through plotly's objects count

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle: a LazyFigure of the current dict
        return (lazy_figure, (self.to_dict(),))


LazyFigure.__module__, LazyFigure.__qualname__ = "plotly.graph_objs._figure", "Figure"


class _FigureBeingBuilt(LazyFigure):
    """A ``LazyFigure`` while one thread builds it: other threads' lookups wait for the build."""

    def __getattribute__(self, name: str) -> Any:
        state = object.__getattribute__(self, "__dict__")
        if state["_builder"] != threading.get_ident():
            with state["_lock"]:  # held by the builder until the figure is whole
                pass
        return object.__getattribute__(self, name)


def _build(fig: LazyFigure) -> None:
    """Turn ``fig`` into the plotly figure of its dict (the caller holds ``fig``'s lock)."""
    state = fig.__dict__
    state["_builder"] = threading.get_ident()
    object.__setattr__(fig, "__class__", _FigureBeingBuilt)
    try:
        # from a copy: plotly takes keys out of the dicts it is given while it builds
        go.Figure.__init__(fig, _copy_json(state["_spec"]), _validate=False)
    finally:
        object.__setattr__(fig, "__class__", LazyFigure)
        state["_builder"] = None
    del state["_spec"]


def lazy_figure(spec: dict[str, Any]) -> LazyFigure:
    """A ``LazyFigure`` of ``spec``: how a copied or unpickled one is made again (pickle finds a
    function by its name; the class answers to plotly's name, which is ``go.Figure``'s)."""
    return LazyFigure(spec)


def _copy_json(value: Any) -> Any:
    """A copy of a figure dict's dicts and lists; what they hold (strings, numbers) is shared. A
    third of ``copy.deepcopy``'s time, which checks every string it meets."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def wire_json(figure: go.Figure) -> str:
    """The JSON a browser receives for ``figure`` from ``st.plotly_chart``: the two plotly calls
    Streamlit makes (a dict copy of the figure, then unvalidated serialisation). What the page
    bench times and the launcher's warm-up runs once."""
    import plotly.tools

    return pio.to_json(plotly.tools.return_figure_from_figure_or_data(figure, validate_figure=True), validate=False)


# plotly.js typed arrays: numpy dtype -> the spec's dtype name (plotly.py's own table)
TYPED_ARRAY_DTYPES = {
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float32": "f4",
    "float64": "f8",
}


def typed_array(values: np.ndarray) -> dict[str, str] | np.ndarray:
    """A numeric array as a plotly.js typed-array spec (``{"dtype", "bdata"[, "shape"]}``), the
    form plotly writes into a figure's JSON; any other array as it is.

    Plotly makes the same spec at every serialisation, after copying the array and asking narwhals
    what it is (about 0.1 ms an array, the larger part of a small chart's JSON time); made once
    here, ``st.plotly_chart`` passes it through. 64-bit integers shrink to the smallest type that
    holds them, as plotly does (plotly.js has no 64-bit integers)."""
    if values.size == 0:
        return values
    if values.dtype.kind in "iu" and values.dtype.itemsize == 8:
        low, high = int(values.min()), int(values.max())
        kinds = (np.int8, np.int16, np.int32) if values.dtype.kind == "i" else (np.uint8, np.uint16, np.uint32)
        fitting = next((kind for kind in kinds if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max), None)
        if fitting is None:
            return values
        values = values.astype(fitting)
    name = TYPED_ARRAY_DTYPES.get(str(values.dtype))
    if name is None:
        return values
    spec = {"dtype": name, "bdata": base64.b64encode(np.ascontiguousarray(values)).decode("ascii")}
    if values.ndim > 1:
        spec["shape"] = str(values.shape)[1:-1]
    return spec


# keys under which plotly's ``to_dict`` leaves arrays as they are (``convert_to_base64``)
UNCONVERTED_KEYS = frozenset({"geojson", "layer", "layers", "range"})
_ATOMS = (str, int, float)


def _plain(props: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """``props`` (a trace's or the layout's dict) as plotly's unvalidated ``to_dict`` would give it
    back, so that a ``LazyFigure`` sends what a built figure sends:

    * every array value of a dict a typed-array spec (plotly's ``convert_to_base64``, same rules:
      not under ``UNCONVERTED_KEYS``, dicts inside lists too); an array plotly.js has no typed
      array for (text, booleans, empty) a list, the JSON plotly writes for it;
    * no top-level property set to None: plotly takes None there as "not set" and leaves it out
      (deeper, it keeps it)."""
    out = {}
    for key, value in props.items():
        if value is None and top:
            continue
        if value is None or isinstance(value, _ATOMS) or key in UNCONVERTED_KEYS:
            pass
        elif isinstance(value, dict):
            value = _plain(value, top=False)
        elif isinstance(value, (list, tuple)):
            value = _plain_items(value)
        elif isinstance(value, np.ndarray) or is_homogeneous_array(value):  # a pandas Series, a tensor...
            value = typed_array(value) if isinstance(value, np.ndarray) else to_typed_array_spec(value)
            if isinstance(value, np.ndarray):
                value = value.tolist()
        out[key] = value
    return out


def _plain_items(items: list[Any] | tuple[Any, ...]) -> list[Any] | tuple[Any, ...]:
    """A list's dicts (shapes, annotations), however deep in lists, made ``_plain``; the rest as is."""
    if all(isinstance(item, _ATOMS) for item in items):  # labels, numbers: most lists
        return items
    return [
        _plain(item, top=False)
        if isinstance(item, dict)
        else _plain_items(item)
        if isinstance(item, (list, tuple))
        else item
        for item in items
    ]


def array_values(value: Any, dtype: Any = None) -> np.ndarray:
    """The numbers of a figure's array property (``fig.data[0].z``) as a numpy array (of ``dtype``
    when given), whether the figure holds them as a typed-array spec, an array or a list."""
    if isinstance(value, dict) and "bdata" in value:
        stored = {name: numpy_name for numpy_name, name in TYPED_ARRAY_DTYPES.items()}[value["dtype"]]
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=stored)
        shape = value.get("shape")
        value = flat.reshape([int(n) for n in shape.split(",")]) if shape else flat
    return np.asarray(value, dtype=dtype)


def plotly_trace(cls: type, **kwargs: object) -> dict[str, Any]:
    """A plotly trace as a dict (``go.Heatmap`` -> ``{"type": "heatmap", ...}``); ``go.Figure``
    validates it when ``VALIDATE`` is on."""
    return {"type": cls.__name__.lower(), **kwargs}


def token_axis(fig: go.Figure, trace: Trace, size: int, row: int | None = None, col: int | None = None) -> None:
    """Token x-axis: token text as ticks for short prompts, positions (or bin starts) otherwise."""
    kwargs = {} if row is None else {"row": row, "col": col}
    T = trace.num_tokens
    if size == 1 and T <= TICK_TEXT_LIMIT:
        fig.update_xaxes(
            tickmode="array",
            tickvals=list(range(T)),
            ticktext=[display_token(t) for t in trace.tokens],
            tickangle=-60,
            title_text="token",
            **kwargs,
        )
    else:
        title = "token position" if size == 1 else f"token position (bins of {size})"
        fig.update_xaxes(title_text=title, **kwargs)


def f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).numpy()


def scatter(n_points: int) -> type:
    return go.Scattergl if n_points > WEBGL_THRESHOLD else go.Scatter


def expert_axis(fig: go.Figure, E: int, axis: str = "y") -> None:
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    if E <= 32:
        update(tickmode="array", tickvals=list(range(E)), ticktext=[str(e) for e in range(E)], title_text="expert")
    else:
        update(title_text="expert")


def line_trace(x: np.ndarray, y: torch.Tensor, name: str, color: str, hover: str) -> dict[str, Any]:
    """A line of ``y`` over ``x`` (WebGL when long); ``hover`` is the hover template's text."""
    return plotly_trace(
        scatter(len(x)),
        x=x,
        y=f32(y),
        mode="lines",
        name=name,
        line={"color": color},
        hovertemplate=hover + "<extra></extra>",
    )
