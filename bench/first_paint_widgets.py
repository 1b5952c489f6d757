"""What widgets cost the first chart: the bare page of ``bench/first_paint.py`` with widgets added.

Each variant is the bare page (the Explore page's first heatmap drawn with ``st.plotly_chart``)
plus the kinds of widgets the Explore page shows around it: in the sidebar a select box, a radio,
a slider, a number input and a toggle; in the page a form with a text area and a row of metrics.

* ``bare``: no widget;
* ``before``: the widgets, then the chart (the order in which a page usually sends them);
* ``after``: the chart first, the widgets sent after it into a container drawn above it;
* ``delayed``: as ``after``, the widgets sent 0.6 s after the chart (a timer: what it would take);
* ``text``: twelve lines of text instead of the widgets;
* with ``--single``, also one page per widget kind, that kind alone before the chart.

Warm servers, a new browser context per sample, variants interleaved; prints the median seconds
from ``page.goto`` to the first drawn chart and each variant / bare.

    python bench/first_paint_widgets.py --samples 7 --single
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from first_paint import CHROMIUM, CHROMIUM_ARGS, visit, write_bare_page  # noqa: E402
from streamlit_client import Server  # noqa: E402  (first_paint put tests/ on the path)

HEAD = 'import plotly.io as pio\nimport streamlit as st\nst.set_page_config(page_title="x", layout="wide")\nst.title("t")\n'
SIDEBAR = {
    "select box": 'st.sidebar.selectbox("Model", ["a", "b"])\n',
    "radio": 'st.sidebar.radio("Mode", ["top-k", "capacity", "ensemble"])\n',
    "slider": 'st.sidebar.slider("k", 1, 8, 2)\n',
    "number input": 'st.sidebar.number_input("factor", 0.1, 4.0, 1.0)\n',
    "toggle": 'st.sidebar.toggle("x")\n',
}
FORM = 'with {slot}:\n    with st.form("f"):\n        st.text_area("Prompt", "hello")\n        st.form_submit_button("Run")\n'
METRICS = 'with {slot}:\n    for i, col in enumerate(st.columns(4)):\n        col.metric(f"m{{i}}", i)\n'
SINGLE = {**SIDEBAR, "form": FORM.format(slot="st.container()"), "metrics": METRICS.format(slot="st.container()")}


def pages(folder: Path, single: bool) -> dict[str, Path]:
    bare = write_bare_page(folder)
    chart = bare.read_text().splitlines()[-1] + "\n"  # the st.plotly_chart line
    widgets = "".join(SIDEBAR.values()) + FORM + METRICS
    sources = {
        "before": HEAD + widgets.format(slot="st.container()") + chart,
        "after": HEAD + "slot = st.container()\n" + chart + widgets.format(slot="slot"),
        "delayed": HEAD
        + "slot = st.container()\n"
        + chart
        + "import time\ntime.sleep(0.6)\n"
        + widgets.format(slot="slot"),
        "text": HEAD + chart + "".join(f"st.markdown('line {i}')\n" for i in range(12)),
    }
    if single:
        sources |= {f"only {name}": HEAD + code + chart for name, code in SINGLE.items()}
    scripts = {"bare": bare}
    for i, (name, source) in enumerate(sources.items()):
        scripts[name] = folder / f"variant_{i}.py"
        scripts[name].write_text(source)
    return scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7, help="samples per variant")
    parser.add_argument("--single", action="store_true", help="also one page per widget kind")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"Debian chromium not found at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="moe-viz-widgets-") as tmp:
        scripts = pages(Path(tmp), args.single)
        first: dict[str, list[float]] = {name: [] for name in scripts}
        servers = [Server(env={"HF_HUB_OFFLINE": "1"}, script=path) for path in scripts.values()]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for server in servers:
                    server.__enter__()
                    visit(browser, server.url, 1, 60_000)  # the server's first visit: not sampled
                for i in range(args.samples):
                    order = list(zip(scripts, servers))
                    for name, server in order if i % 2 == 0 else order[::-1]:
                        first[name].append(visit(browser, server.url, 1, 60_000)[0])
                    print(f"  sample {i + 1}/{args.samples} done", file=sys.stderr, flush=True)
            finally:
                for server in servers:
                    server.__exit__()
                browser.close()
    bare = statistics.median(first["bare"])
    print(f"\nfirst chart, medians of {args.samples} warm samples (seconds from page.goto)")
    for name, values in first.items():
        median = statistics.median(values)
        print(f"{name:18s} {median:6.2f} s  {median / bare:5.2f}x bare")


if __name__ == "__main__":
    main()
