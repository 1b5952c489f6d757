"""Page building blocks: prompt form, a view (chart + explanation), downloads, error display.

No model maths here: numbers come from ``moe_viz`` (traces, metrics, views), this module only
lays them out.
"""

from __future__ import annotations

import html
import io
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import first_paint
from app.resources import Keys, config, current_prompt, evicted_note, get_trace
from app.sidebar import PageContext, page_context
from moe_viz import MoEModel, Trace, trace_io
from moe_viz.views import View

FIGURES_KEY = "_page_figures"  # figures drawn by the current page run, for the HTML download
# Small tables (up to this many rows and columns) are drawn as static tables; bigger ones in the
# scrolling, sortable data grid. The grid's script (with Arrow's) is the largest the browser
# fetches besides plotly's, and a page that shows one makes the browser fetch and parse it while
# plotly's arrives: on Explore the first chart came 0.35 s later (1.59x the bare page, not 1.41x).
STATIC_TABLE_ROWS = 20
STATIC_TABLE_COLUMNS = 8  # a static table does not scroll sideways: wider ones go to the grid


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "trace"


def prompt_form(page: str, label: str = "Prompt") -> str:
    """The shared prompt in a form: typing does not rerun anything until **Run** is pressed."""
    cfg = config()
    with st.form(f"prompt_form_{page}"):
        text = st.text_area(
            label,
            value=current_prompt(),
            max_chars=cfg.max_prompt_chars,
            key=f"prompt_input_{page}",
            height=100,
            help=f"Up to {cfg.max_prompt_tokens} tokens. The same prompt is used on every page.",
        )
        submitted = st.form_submit_button("Run", type="primary")
    if submitted:
        st.session_state[Keys.PROMPT] = text
    return current_prompt()


@contextmanager
def shows_errors() -> Iterator[None]:
    """Turn the library's ValueErrors into an ``st.error`` and stop the page (not the session)."""
    try:
        yield
    except ValueError as err:
        if first_paint.staged():  # the first chart cannot come first: the whole page says why
            first_paint.whole_page_now()
        st.error(str(err))
        st.stop()


def require_model() -> PageContext:
    """The sidebar's context; stops the page with an error when no model or policy is usable."""
    ctx = page_context()
    if ctx.model is None:
        st.error(ctx.model_error or "No model is loaded; pick one in the sidebar.")
        st.stop()
    return ctx


def require_policy(ctx: PageContext) -> None:
    if ctx.policy_error:
        st.error(ctx.policy_error)
        st.stop()


def start_figures() -> None:
    st.session_state[FIGURES_KEY] = {}


def traced_page(title: str, page: str) -> tuple[MoEModel, int, Trace]:
    """The common start of a page that shows one trace: title, the sidebar's model and layer, the
    prompt form, and this session's trace of the prompt under the sidebar's policy (errors stop
    the page with a message)."""
    st.title(title)
    # The form and the run's notices share one block, which the run that sends Explore's first
    # chart alone leaves empty (app/first_paint.py): the charts below then keep their places.
    with first_paint.block("prompt", reserve_px=188):  # the prompt form's height in the default theme
        ctx = require_model()
        model, layer = ctx.model, ctx.layer
        assert model is not None and layer is not None
        prompt = current_prompt() if first_paint.staged() else prompt_form(page)
        require_policy(ctx)
        start_figures()
        with shows_errors():
            trace = get_trace(model, prompt, ctx.policy)
        note = evicted_note()
        if note:
            st.info(note)
    return model, layer, trace


def show(view: View, key: str | None = None, ratio: tuple[int, int] = (3, 2), heading: bool = True) -> None:
    """A view: its title as a subheading, the picture (chart, table or HTML) with its explanation
    beside it. Charts are remembered for the page's HTML download."""
    if heading:
        st.subheader(view.title)
    left, right = st.columns(list(ratio), vertical_alignment="center")
    with left:
        if view.figure is not None:
            st.session_state.setdefault(FIGURES_KEY, {})[view.title] = view.figure
            st.plotly_chart(view.figure, key=key or view.name, width="stretch", config={"displaylogo": False})
        elif view.html is not None:
            with st.container(height=320 if view.html.count("moe-tok") > 200 else "content", border=False):
                st.html(view.html)  # long texts scroll
        else:
            draw_table(view.table)
            csv_download("Table (CSV)", view.table, slug(view.name), key=f"csv_{key or view.name}")
    with right:
        st.markdown(view.explanation)


def draw_table(table: pd.DataFrame) -> None:
    """A small table as a static table (floats to 4 significant digits, so that 3e-11 and 1.3e+09
    stay readable), a bigger one in the data grid."""
    plain_index = isinstance(table.index, pd.RangeIndex)
    if len(table) > STATIC_TABLE_ROWS or len(table.columns) > STATIC_TABLE_COLUMNS:
        st.dataframe(table, hide_index=plain_index, width="stretch")
        return
    styler = table.style.format(lambda v: f"{v:.4g}" if isinstance(v, float | np.floating) else v, na_rep="—")
    st.table(styler.hide(axis="index") if plain_index else styler)


def csv_download(label: str, frame: pd.DataFrame, name: str, key: str) -> None:
    """A download button for the numbers behind an analysis (built only when pressed)."""
    st.download_button(
        label,
        data=lambda: frame.to_csv(index=False),
        file_name=f"moe-viz-{name}.csv",
        mime="text/csv",
        key=key,
        on_click="ignore",
    )


def figures_html(figures: dict[str, go.Figure], title: str) -> str:
    """One standalone HTML file with every figure; plotly.js is embedded once, so it works offline."""
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
        parts.append(f"<section><h2>{html.escape(name)}</h2>{div}</section>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;}section{margin-bottom:2em;}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def _parquet_bytes(trace: Trace) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.parquet"
        trace_io.save_parquet(trace, path)
        return path.read_bytes()


def _csv_zip(trace: Trace) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, frame in trace_io.to_frames(trace).items():
            archive.writestr(f"{name}.csv", frame.to_csv(index=False))
    return buffer.getvalue()


def downloads(trace: Trace, page: str) -> None:
    """Download buttons for the trace (JSON, Parquet, CSV) and the page's figures (HTML).

    The files are built only when a button is pressed (deferred callables), so the page does not
    pay for them on every rerun.
    """
    figures = dict(st.session_state.get(FIGURES_KEY, {}))
    name = f"moe-viz-{slug(trace.policy)}"
    st.markdown("**Download**")
    files = [
        ("Trace (JSON)", lambda: trace_io.to_json_text(trace), f"{name}.json", "application/json", "json"),
        (
            "Trace (Parquet)",
            lambda: _parquet_bytes(trace),
            f"{name}.parquet",
            "application/vnd.apache.parquet",
            "parquet",
        ),
        ("Trace (CSV, zip)", lambda: _csv_zip(trace), f"{name}-csv.zip", "application/zip", "csv"),
        (
            "Figures (HTML)",
            lambda: figures_html(figures, f"moe-viz · {page} · {trace.policy}"),
            f"moe-viz-{page}-figures.html",
            "text/html",
            "html",
        ),
    ]
    for col, (label, data, file_name, mime, kind) in zip(st.columns(len(files)), files):
        is_html = kind == "html"
        col.download_button(
            label,
            data=data,
            file_name=file_name,
            mime=mime,
            key=f"dl_{kind}_{page}",
            on_click="ignore",
            disabled=is_html and not figures,
            help="All charts of this page in one file that opens offline (plotly.js embedded)." if is_html else None,
        )
