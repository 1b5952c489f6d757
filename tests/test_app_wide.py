"""Every page stays readable on a real checkpoint's routing shape: thin random models with 256
experts in 61 layers and 128 experts in 94 layers (top-8), loaded from a folder, driven through
AppTest. No exception; the coloured text's legend names at most the coloured experts plus one
"other" chip; every chart stays within its height cap; the run summary stays one short line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apptest_helpers import clean, click, errors  # noqa: E402
from wide_models import SHAPES, save_wide_model  # noqa: E402

from moe_viz.views._experts import COLOURED_EXPERTS, MAX_HEIGHT  # noqa: E402

PAGES = [
    "app_pages/explore.py",
    "app_pages/load_balance.py",
    "app_pages/compare.py",
    "app_pages/interventions.py",
    "app_pages/corpus.py",
    "app_pages/paper.py",
    "app_pages/import_routing.py",
    "app_pages/learn.py",
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(SHAPES))
def wide_model(request, tmp_path_factory) -> tuple[str, tuple[int, int, int]]:
    experts, layers, top_k = SHAPES[request.param]
    folder = save_wide_model(tmp_path_factory.mktemp(request.param), experts, layers, top_k)
    return str(folder), SHAPES[request.param]


def values(x) -> list:  # noqa: ANN001 - a plotly array: a list, or {"bdata": base64, "dtype": ...}
    if isinstance(x, dict):
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"]).tolist()
    return list(x)


def chart_heights(at) -> list[int]:
    return [json.loads(c.proto.spec)["layout"].get("height") or 450 for c in at.get("plotly_chart")]


def legend_chips(at) -> list[int]:
    """Chips in each coloured text's legend (the part before the text itself)."""
    bodies = [h.proto.body for h in at.get("html") if "moe-viz-legend" in h.proto.body]
    return [body.split("moe-viz-text")[0].count("border-radius:3px") for body in bodies]


def test_every_page_reads_on_hundreds_of_experts_and_dozens_of_layers(monkeypatch, wide_model):
    from streamlit.testing.v1 import AppTest

    folder, (experts, layers, top_k) = wide_model
    monkeypatch.setenv("MOE_VIZ_MODEL", folder)
    at = AppTest.from_file(str(APP), default_timeout=600).run()
    for page in PAGES:
        at = at.switch_page(page).run()
        clean(at)
        assert not errors(at), (page, errors(at))
        assert all(h <= MAX_HEIGHT for h in chart_heights(at)), (page, chart_heights(at))
        assert all(n <= COLOURED_EXPERTS + 1 for n in legend_chips(at)), (page, legend_chips(at))
        summaries = [c.value for c in at.caption if c.value.startswith("Run summary:")]
        for line in summaries:
            assert "\n" not in line and len(line) < 200, line
            assert f"0 dropped in all {layers} layers" in line or re.search(rf"in \d+ of {layers} layers", line)
        if page == "app_pages/explore.py":
            assert legend_chips(at), "the Explore page shows the coloured text"
            # the token's per-layer fragility has a row per MoE layer: too long for a static table
            assert any(len(d.value) == layers for d in at.dataframe)
            heat = json.loads(at.get("plotly_chart")[0].proto.spec)
            assert len(heat["data"][0]["y"]) == 25  # the 24 busiest experts and one row for the rest
            at.multiselect(key="explore_experts").set_value([0, 1, 2]).run()
            clean(at)
            heat = json.loads(at.get("plotly_chart")[0].proto.spec)
            assert heat["data"][0]["y"][:3] and len(heat["data"][0]["y"]) == 4  # the chosen three, then the rest
    at = at.switch_page("app_pages/load_balance.py").run()
    cards = {m.label: m.value for m in at.metric}
    assert cards["Effective experts"].endswith(f"/{experts}") and len(cards["Effective experts"]) <= 8
    assert click(at, "Generate and split the load") is not None


def test_a_long_prompt_zooms_into_a_token_range_on_the_explore_page(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from moe_viz import DEFAULT_MODEL

    monkeypatch.setenv("MOE_VIZ_MODEL", DEFAULT_MODEL)
    at = AppTest.from_file(str(APP), default_timeout=600).run()
    long = " ".join(f"token{i} goes to its experts." for i in range(160))
    at.text_area(key="prompt_input_explore").set_value(long)
    at = click(at, "Run")
    clean(at)
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "bins of" in heat["layout"]["title"]["text"]  # the whole prompt, binned
    at.slider(key="explore_token_range").set_value((100, 199)).run()
    clean(at)
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "bins of" not in heat["layout"]["title"]["text"] and len(values(heat["data"][0]["x"])) == 100
