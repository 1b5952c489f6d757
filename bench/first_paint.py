"""First paint in Debian chromium: the Explore page against a bare Streamlit + plotly page.

The bare page (written to a temporary folder) is the limit of the stack: ``st.plotly_chart`` of one
heatmap, the very figure the Explore page draws first (its token x expert heatmap of the default
prompt, saved as JSON and read back with plotly), and nothing else. The Explore page is the app
(``app/streamlit_app.py``) on the default model and the default prompt.

Each sample is a new browser context (empty cache) that opens the page; the clock runs from
``page.goto`` to the first plotly chart drawn (``.js-plotly-plot`` with plotly's ``_fullLayout``
and a ``.main-svg``) and to every chart the page shows (the count is taken once, on a prior visit,
after Streamlit's readiness rule). Cold: a new server process per sample, navigated to right after
it is ready: the bare page when its health check answers, the app when ``app/launch.py`` (how the
app is served: ``moe-viz app``, the Docker image) reports ready, its model loaded (the time from
process start to ready is printed separately). Warm: a
server that already served one visit. Bare and Explore samples alternate, cold and warm samples
alternate, and the order flips every repeat. Prints medians, and Explore / bare for each; the goal
is warm <= 1.1x and cold <= 1.5x the bare page.

    python bench/first_paint.py --warm 5 --cold 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from streamlit_client import Server  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_ARGS, wait_ready  # noqa: E402

from moe_viz import DEFAULT_MODEL  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
KINDS = ("bare", "explore")
BARE_PAGE = """\
import plotly.io as pio
import streamlit as st

st.set_page_config(page_title="bare plotly", layout="wide")
st.title("Bare Streamlit + plotly")
st.plotly_chart(pio.read_json({figure!r}), width="stretch", config={{"displaylogo": False}})
"""
# Drawn charts: plotly has laid the chart out and put its SVG in the page.
DRAWN = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(el => el._fullLayout && el.querySelector('.main-svg')).length"""


def write_bare_page(folder: Path) -> Path:
    """The bare page and the Explore page's own first heatmap (default model, prompt and mode) as JSON."""
    from app.config import DEFAULT_PROMPT
    from moe_viz import load_model, parse_policy, run_prompt, views

    model = load_model(MODEL)
    trace = run_prompt(model, DEFAULT_PROMPT, parse_policy(f"top-k:{model.top_k}"))
    heatmap = views.explore_views(trace, model.moe_layers[0])[0]
    figure = folder / "heatmap.json"
    figure.write_text(heatmap.figure.to_json())
    script = folder / "bare_page.py"
    script.write_text(BARE_PAGE.format(figure=str(figure)))
    return script


def visit(browser, url: str, charts: int, timeout_ms: int) -> tuple[float, float]:
    """Seconds from ``page.goto`` to the first drawn chart and to ``charts`` drawn charts, in a new context."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        t0 = time.perf_counter()
        page.goto(url, wait_until="commit")
        page.wait_for_function(f"() => ({DRAWN})() >= 1", polling="raf", timeout=timeout_ms)
        first = time.perf_counter() - t0
        page.wait_for_function(f"(n) => ({DRAWN})() >= n", arg=charts, polling="raf", timeout=timeout_ms)
        every = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"page errors on {url}: {errors}")
        return first, every
    finally:
        context.close()


def count_charts(browser, url: str, timeout_ms: int) -> int:
    """A prior visit: wait for Streamlit's readiness rule, then count the drawn charts."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.goto(url)
        wait_ready(page, timeout_ms=timeout_ms)
        page.wait_for_function(f"() => ({DRAWN})() >= 1", timeout=timeout_ms)
        page.wait_for_timeout(1000)  # let the last charts finish drawing
        return int(page.evaluate(f"({DRAWN})()"))
    finally:
        context.close()


def server(scripts: dict[str, Path], kind: str, env: dict[str, str]) -> Server:
    """The bare page under ``streamlit run``, ready at its health check; the app as it is served
    (``moe-viz app``: ready once its model is loaded and warm)."""
    return Server(env=env, script=scripts[kind], launcher=kind == "explore")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=5, help="warm samples per page")
    parser.add_argument("--cold", type=int, default=3, help="cold samples (fresh server each) per page")
    parser.add_argument("--hosted", action="store_true", help="run the app in hosted mode (MOE_VIZ_HOSTED=1)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds one visit may take")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"Debian chromium not found at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    env = {"MOE_VIZ_MODEL": MODEL, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.hosted:
        env["MOE_VIZ_HOSTED"] = "1"
    timeout_ms = int(args.timeout * 1000)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe-viz-first-paint-") as tmp:
        scripts = {"bare": write_bare_page(Path(tmp)), "explore": ROOT / "app" / "streamlit_app.py"}
        # {(kind, "cold"|"warm"): [(first, every), ...]}, and server start-up seconds per kind
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {
            (k, w): [] for k in KINDS for w in ("cold", "warm")
        }
        startup: dict[str, list[float]] = {k: [] for k in KINDS}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            with server(scripts, "bare", env) as warm_bare, server(scripts, "explore", env) as warm_explore:
                warm = {"bare": warm_bare, "explore": warm_explore}
                charts = {k: count_charts(browser, s.url, timeout_ms) for k, s in warm.items()}
                print(f"charts per page: {charts}", file=sys.stderr, flush=True)
                for i in range(max(args.warm, args.cold)):
                    order = KINDS if i % 2 == 0 else KINDS[::-1]
                    for kind in order:
                        if i < args.cold:
                            with server(scripts, kind, env) as fresh:
                                startup[kind].append(fresh.startup_s)
                                samples[kind, "cold"].append(visit(browser, fresh.url, charts[kind], timeout_ms))
                            print(f"  cold {kind:8s} {samples[kind, 'cold'][-1]}", file=sys.stderr, flush=True)
                        if i < args.warm:
                            samples[kind, "warm"].append(visit(browser, warm[kind].url, charts[kind], timeout_ms))
                            print(f"  warm {kind:8s} {samples[kind, 'warm'][-1]}", file=sys.stderr, flush=True)
            browser.close()
    wall = time.perf_counter() - t_start

    print(f"\nfirst paint in Debian chromium, medians (seconds from page.goto); model {Path(MODEL).name}")
    print(f"charts per page: bare {charts['bare']}, explore {charts['explore']}; wall {wall:.0f} s")
    print(f"{'page':10s}{'state':7s}{'n':>3s}{'first chart':>13s}{'all charts':>12s}{'start->ready':>15s}")
    med: dict[tuple[str, str], tuple[float, float]] = {}
    for state in ("warm", "cold"):
        for kind in KINDS:
            rows = samples[kind, state]
            med[kind, state] = (median([r[0] for r in rows]), median([r[1] for r in rows]))
            health = f"{median(startup[kind]):15.2f}" if state == "cold" else f"{'':15s}"
            print(f"{kind:10s}{state:7s}{len(rows):3d}{med[kind, state][0]:13.2f}{med[kind, state][1]:12.2f}{health}")
    print("\nExplore / bare")
    goals = {"warm": 1.1, "cold": 1.5}
    for state, goal in goals.items():
        first = med["explore", state][0] / med["bare", state][0]
        every = med["explore", state][1] / med["bare", state][1]
        verdict = " ".join("meets" if r <= goal else "misses" for r in (first, every))
        print(
            f"{state:5s} first chart {first:5.2f}x   all charts {every:5.2f}x   goal <= {goal}x (first, all): {verdict}"
        )


if __name__ == "__main__":
    main()
