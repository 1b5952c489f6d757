"""Drive the real app in Debian chromium (Playwright) against ``streamlit run`` on loopback:
type a prompt, switch each mode, see the heatmap change, download a trace; upload a corpus and
see its statistics, then the papers' figures in Paper mode. Screenshots go to
``artifacts/`` (git-ignored). Never downloads a browser: skips when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamlit_client import streamlit_command  # noqa: E402

from moe_viz import DEFAULT_MODEL  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian chromium not found at {CHROMIUM}"),
    pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(), reason=f"no model at {MODEL}"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, MOE_VIZ_MODEL=MODEL, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "streamlit-server.log", "w")
    proc = subprocess.Popen(
        streamlit_command(port),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"streamlit did not start; see {ARTIFACTS / 'streamlit-server.log'}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_ready(page, timeout_ms: int = 90_000) -> None:
    """Streamlit's own readiness rule: app view, connected, script not running, no skeletons."""
    page.wait_for_selector("[data-testid='stAppViewContainer']", timeout=timeout_ms)
    try:  # a rerun may start a moment after the click; give it the chance to
        page.wait_for_selector("[data-testid='stApp'][data-test-script-state='running']", timeout=800)
    except playwright_api.TimeoutError:
        pass
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout_ms)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector(\"[data-testid='stSkeleton']\")", timeout=timeout_ms)


def heatmap_data(page) -> str:
    """The first plotly chart's data (the token x expert heatmap), as JSON."""
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    return page.evaluate("() => JSON.stringify(document.querySelector('.js-plotly-plot').data)")


def routing_shown(page) -> str:
    """The policy spec the Explore page says it ran ("Routing: `top-k:2` on ...")."""
    line = page.locator("[data-testid='stMarkdownContainer']", has_text="Routing:").first
    return line.locator("code").first.inner_text().strip()


def shot(page, name: str, height: int = 3600) -> None:
    """Screenshot the whole page: Streamlit scrolls inside its own container, so make the window tall."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": height})
    page.wait_for_timeout(600)  # let plotly re-layout
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))
    page.set_viewport_size(size)


def test_type_a_prompt_switch_each_mode_and_download_a_trace(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    wait_ready(page)
    shot(page, "1-explore-start")

    box = page.get_by_label("Prompt", exact=True)
    box.fill(PROMPT)
    page.get_by_role("button", name="Run", exact=True).click()
    wait_ready(page)
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value.includes('print(add'))")
    seen = {"top-k": heatmap_data(page)}
    assert routing_shown(page).startswith("top-k:")
    shot(page, "2-explore-top-k")

    modes = page.get_by_test_id("stSidebar").get_by_role("radiogroup", name="Mode", exact=True)
    for mode in ("capacity", "ensemble"):
        modes.get_by_text(mode, exact=True).click()
        wait_ready(page)
        page.wait_for_function(
            "(m) => [...document.querySelectorAll('code')].some(e => e.innerText.startsWith(m + ':'))", arg=mode
        )
        assert routing_shown(page).startswith(mode)
        seen[mode] = heatmap_data(page)
        shot(page, f"3-explore-{mode}")
    assert len(set(seen.values())) == 3, "the heatmap must change with each mode"
    assert not page.locator("[data-testid='stException']").count()

    modes.get_by_text("top-k", exact=True).click()
    wait_ready(page)
    with page.expect_download() as info:
        page.get_by_role("button", name="Trace (JSON)").click()
    path = ARTIFACTS / "browser-trace.json"
    info.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["schema"] == "moe-viz/trace" and data["meta"]["prompt"] == PROMPT
    with page.expect_download() as info:
        page.get_by_role("button", name="Figures (HTML)").click()
    html_path = ARTIFACTS / "browser-figures.html"
    info.value.save_as(html_path)
    html = html_path.read_text()
    assert html.count("<section>") == 5 and '<script src="http' not in html  # every chart, plotly.js inline

    for name in ("Load balance", "Compare modes", "Learn"):
        page.get_by_test_id("stSidebarNav").get_by_text(name, exact=True).click()
        wait_ready(page)
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        assert not page.locator("[data-testid='stException']").count(), name
        shot(page, f"4-{name.lower().replace(' ', '-')}")
    assert not errors, errors
    context.close()


# Watches the page from its first byte: when the first plotly chart has drawn its SVG, mark that
# element and note what else the page held at that moment.
FIRST_CHART_WATCH = """
window.__atFirstChart = null;
new MutationObserver(() => {
  if (window.__atFirstChart) return;
  const plot = [...document.querySelectorAll('.js-plotly-plot')].find(el => el._fullLayout && el.querySelector('.main-svg'));
  if (!plot) return;
  plot.dataset.firstDrawn = 'yes';
  window.__atFirstChart = {
    sidebarWidgets: document.querySelectorAll('section[data-testid=stSidebar] .stRadio, section[data-testid=stSidebar] .stSelectbox').length,
    promptBoxes: document.querySelectorAll('textarea').length,
    charts: document.querySelectorAll('.js-plotly-plot').length,
  };
  // where the heatmap sits, every frame from then on
  window.__heatmapTops = [];
  const track = () => { window.__heatmapTops.push(Math.round(plot.getBoundingClientRect().top)); requestAnimationFrame(track); };
  track();
}).observe(document, {subtree: true, childList: true});
"""


def test_explore_draws_its_heatmap_before_the_rest_and_keeps_it_in_place_when_the_rest_arrives(server, browser):
    # The model loaded, as the launcher does before the first visitor (a session that has to load it
    # gets the whole page at once, with the load's progress in the sidebar).
    open_page(server, browser, "Explore")[0].close()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(FIRST_CHART_WATCH)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    at_first_chart = page.wait_for_function("() => window.__atFirstChart", timeout=90_000).json_value()
    assert at_first_chart == {"sidebarWidgets": 0, "promptBoxes": 0, "charts": 1}

    # The beacon saw the chart drawn and asked for the rest: the whole page, the heatmap untouched.
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=90_000)
    wait_ready(page)
    assert page.get_by_label("Prompt", exact=True).is_visible()
    assert page.get_by_test_id("stSidebar").get_by_role("radiogroup", name="Mode", exact=True).is_visible()
    first = page.evaluate("() => document.querySelector('.js-plotly-plot').dataset.firstDrawn")
    assert first == "yes", "the heatmap drawn first must stay in place, not be drawn again"
    # ... and in the same place in every frame, while the rest arrives and its widgets load
    tops = page.evaluate("() => window.__heatmapTops")
    assert len(tops) > 10 and max(tops) - min(tops) <= 2, sorted(set(tops))
    assert routing_shown(page).startswith("top-k:")
    assert not page.locator("[data-testid='stException']").count()
    assert not errors, errors
    context.close()


def test_explore_still_sends_the_whole_page_when_the_beacon_script_cannot_run(server, browser):
    """The beacon runs as a script Streamlit imports from a blob URL; where such scripts fail (a
    strict content policy, say), the page's own timer asks for the rest a few seconds later."""
    from app.first_paint import FALLBACK_S

    open_page(server, browser, "Explore")[0].close()  # the model loaded (see the test above)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(
        "const make = URL.createObjectURL; URL.createObjectURL = (blob) => blob && blob.type === 'text/javascript'"
        " ? 'data:text/javascript,throw new Error(\"scripts from blobs are blocked\")' : make(blob);"
    )
    page = context.new_page()
    page.goto(server)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 1", timeout=90_000)
    assert not page.get_by_label("Prompt", exact=True).count()  # the first chart alone, the beacon broken
    page.wait_for_function(
        "() => document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=int(FALLBACK_S * 1000) + 30_000
    )
    wait_ready(page)
    assert page.get_by_label("Prompt", exact=True).is_visible()
    assert not page.locator("[data-testid='stException']").count()
    context.close()


def open_page(server, browser, name: str, timeout_ms: int | None = None):
    """A fresh browser context on page ``name`` of the app, and the list its JavaScript errors go to."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server)
    wait_ready(page)
    page.get_by_test_id("stSidebarNav").get_by_text(name, exact=True).click()
    wait_ready(page, **({"timeout_ms": timeout_ms} if timeout_ms else {}))
    return context, page, errors


def test_interventions_page_rejects_a_bad_spec_and_runs_the_ablation_grid(server, browser):
    context, page, errors = open_page(server, browser, "Interventions", timeout_ms=180_000)
    page.get_by_test_id("stMetric").filter(has_text="Mean KL(base ‖ intervened)").wait_for(timeout=120_000)
    assert not page.locator("[data-testid='stException']").count()
    assert not page.get_by_test_id("stAlertContentError").count()

    spec = page.get_by_label("Intervention", exact=True)
    spec.fill("ablate:99:1")
    page.get_by_role("button", name="Apply", exact=True).click()
    wait_ready(page, timeout_ms=120_000)
    alert = page.get_by_test_id("stAlertContentError").filter(has_text="layer 99")
    alert.first.wait_for(timeout=60_000)
    assert "ablate:99:1" in alert.first.inner_text()
    assert not page.locator("[data-testid='stException']").count()
    assert not page.get_by_test_id("stMetric").filter(has_text="Mean KL").count()  # no stale metrics
    shot(page, "5-interventions-bad-spec")

    spec.fill("ablate:0:1")
    page.get_by_role("button", name="Apply", exact=True).click()
    wait_ready(page, timeout_ms=120_000)
    page.get_by_test_id("stMetric").filter(has_text="Mean KL(base ‖ intervened)").wait_for(timeout=120_000)
    assert not page.get_by_test_id("stAlertContentError").filter(has_text="Intervention").count()
    page.get_by_role("button", name="Run the ablation grid", exact=True).click()
    wait_ready(page, timeout_ms=300_000)
    page.get_by_role("heading", name="Causal importance per expert").wait_for(timeout=300_000)
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 3", timeout=120_000)
    assert not page.locator("[data-testid='stException']").count()
    shot(page, "6-interventions-grid")
    assert not errors, errors
    context.close()


CORPUS_ROWS = [
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))", "domain": "code"},
    {"text": "for i in range(10):\n    if i % 2 == 0:\n        print(i * i)", "domain": "code"},
    {"text": "class Stack:\n    def __init__(self):\n        self.items = []", "domain": "code"},
    {"text": "The river wound slowly through the valley, past farms and quiet villages.", "domain": "prose"},
    {"text": "She opened the letter by the window and read it twice before smiling.", "domain": "prose"},
    {"text": "In the spring the town held a market where everyone sold bread and honey.", "domain": "prose"},
]


def test_corpus_page_runs_an_uploaded_corpus_and_paper_mode_shows_the_figures(server, browser, tmp_path):
    corpus = tmp_path / "tiny_corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in CORPUS_ROWS))
    context, page, errors = open_page(server, browser, "Corpus")
    page.get_by_role("radiogroup", name="Corpus", exact=True).get_by_text("Upload a file", exact=True).click()
    wait_ready(page)
    page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(corpus))
    page.get_by_test_id("stFileChipName").filter(has_text=corpus.name).wait_for(timeout=30_000)
    page.get_by_label("Domain column (tables, optional)", exact=True).fill("domain")
    page.get_by_role("button", name="Run the corpus", exact=True).click()
    wait_ready(page, timeout_ms=180_000)
    page.get_by_role("heading", name="Domain information per layer").wait_for(timeout=180_000)
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    assert page.get_by_test_id("stAlertContentSuccess").filter(has_text=f"upload {corpus.name}").count()
    assert page.get_by_test_id("stAlertContentSuccess").filter(has_text="code, prose").count()
    assert not page.get_by_test_id("stAlertContentError").count()
    assert not page.locator("[data-testid='stException']").count()
    shot(page, "7-corpus-upload", height=6000)

    page.get_by_test_id("stSidebarNav").get_by_text("Paper mode", exact=True).click()
    wait_ready(page, timeout_ms=120_000)
    for title in ("Mixtral Fig. 8", "Mixtral Fig. 7", "Mixtral Table 5", "OLMoE"):
        heading = page.get_by_role("heading", name=re.compile("^" + re.escape(title)))
        heading.first.wait_for(timeout=60_000)
    assert page.get_by_test_id("stAlertContentSuccess").filter(has_text=f"upload {corpus.name}").count()
    assert page.locator(".moe-tok").count() > 10  # the coloured text of one uploaded document
    page.wait_for_selector(".js-plotly-plot", timeout=60_000)
    assert not page.locator("[data-testid='stException']").count()
    shot(page, "8-paper", height=6000)
    assert not errors, errors
    context.close()


def test_import_page_shows_an_uploaded_vllm_file_and_its_agreement_with_the_model(server, browser, tmp_path):
    import numpy as np

    from moe_viz import load_model, run_prompt

    trace = run_prompt(load_model(MODEL), PROMPT)
    ids = np.stack([lt.native_index.numpy() for lt in trace.layers], axis=1)[:-1].astype(np.uint8)  # vLLM 0.22+
    upload = tmp_path / "routed_experts.npy"
    np.save(upload, ids)
    context, page, errors = open_page(server, browser, "Import")
    page.locator("[data-testid='stFileUploader'] input[type='file']").set_input_files(str(upload))
    page.get_by_test_id("stFileChipName").filter(has_text=upload.name).wait_for(timeout=30_000)
    page.locator("textarea").first.fill(" ".join(map(str, trace.token_ids)))
    page.get_by_role("button", name="Import", exact=True).click()
    wait_ready(page, timeout_ms=120_000)
    page.get_by_role("heading", name="Token × expert routing, layer 0").wait_for(timeout=60_000)
    assert page.get_by_test_id("stAlertContentSuccess").filter(has_text=upload.name).count()
    page.get_by_role("button", name="Recompute and compare", exact=True).click()
    wait_ready(page, timeout_ms=120_000)
    page.get_by_role("heading", name=re.compile("^Agreement between two routings")).wait_for(timeout=60_000)
    assert page.get_by_text("go to the same experts in both routings").count()
    assert not page.get_by_test_id("stAlertContentError").count()
    assert not page.locator("[data-testid='stException']").count()
    shot(page, "9-import", height=6000)
    assert not errors, errors
    context.close()
