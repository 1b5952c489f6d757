"""AppTest of the "what if" features: the Interventions page (one intervention, the ablation
grid, agreement), sweeps on Compare and Learn, fragility and paths on Explore, prefill vs decode
on Load balance; every bad spec or pattern shows a message, never an exception, and hosted mode
bounds the extra forwards and says so."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apptest_helpers import clean, click, errors, headings  # noqa: E402

from moe_viz import DEFAULT_MODEL  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"

pytestmark = pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(), reason=f"no model at {MODEL}")


@pytest.fixture()
def app(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.session_state["prompt"] = PROMPT
    return at.run()


def test_interventions_page_shows_the_effect_the_ablation_grid_and_agreement(app):
    at = app.switch_page("app_pages/interventions.py").run()
    clean(at)
    assert {"Mean KL(base ‖ intervened)", "Top-1 flips", "Δ log p(actual next token)"} <= {m.label for m in at.metric}
    assert "Agreement between two routings of the prompt" in headings(at)
    assert "Tokens routed differently, layer 0" in headings(at)
    assert any("agreement is lowest in layer" in m.value or "identical in all" in m.value for m in at.markdown)
    at = click(at, "Run the ablation grid")
    clean(at)
    assert {"Causal importance per expert", "Importance against load, layer 0"} <= set(headings(at))
    assert any("one prompt" in m.value for m in at.markdown)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ablate:9:1", "names layer 9, which is not an MoE layer"),
        ("ablate:0:99", "0 <= expert < 8"),
        ("ablate:0:x", "experts must be comma-separated integers"),
        ("force:0:1@500", "0 <= position <"),
        ("top-k:1", "must start with ablate: or force:"),
        ("ablate:0:0,1,2,3,4,5,6", "leaves fewer than the 2 each token needs"),
        ("", "must not be empty"),
    ],
)
def test_a_bad_intervention_spec_shows_a_message_and_the_rest_of_the_page(app, spec, message):
    at = app.switch_page("app_pages/interventions.py").run()
    at.text_input(key="intervention_spec").set_value(spec)
    at = click(at, "Apply")
    clean(at)
    assert any(message in e for e in errors(at)), errors(at)
    assert "Which experts matter: the ablation grid" in headings(at)  # the page goes on


def test_agreement_with_a_bad_policy_shows_a_message(app):
    at = app.switch_page("app_pages/interventions.py").run()
    at.text_input(key="agreement_spec").set_value("capacity:-1")
    at = click(at, "Compare routings")
    clean(at)
    assert any(e.startswith("Other routing:") for e in errors(at)), errors(at)


def test_hosted_mode_bounds_the_ablation_grid_and_the_sweeps_and_says_how_to_fit(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    monkeypatch.setenv("MOE_VIZ_MAX_ANALYSIS_TOKENS", "100")
    at = AppTest.from_file(str(APP), default_timeout=180)
    at.session_state["prompt"] = PROMPT
    at = at.run().switch_page("app_pages/interventions.py").run()
    assert any("at most 100 token rows per analysis" in c.value for c in at.caption)
    at = click(at, "Run the ablation grid")
    clean(at)
    assert any("this server allows at most 100 token rows" in e and "Shorten the prompt" in e for e in errors(at))
    assert "Agreement between two routings of the prompt" in headings(at)  # the refusal leaves the rest of the page
    at = click(at.switch_page("app_pages/compare.py").run(), "Run the sweeps")
    clean(at)
    assert any("The capacity sweep runs 1 forward(s) of 9 copies" in e for e in errors(at)), errors(at)


def test_compare_and_learn_show_the_sweeps(app):
    at = click(app.switch_page("app_pages/compare.py").run(), "Run the sweeps")
    clean(at)
    assert {"Capacity sweep", "k sweep"} <= set(headings(at))
    at = click(at.switch_page("app_pages/learn.py").run(), "Sweep the capacity factor from 0.25 to 4")
    clean(at)
    assert any("From factor" in m.value and "nothing is dropped" in m.value for m in at.markdown)


def test_explore_shows_fragility_edits_and_paths_for_a_pattern(app):
    at = app
    clean(at)
    assert {"Routing fragility", "Expert paths across layers"} <= set(headings(at))
    assert any("ranked by their top-2 margin" in m.value for m in at.markdown)
    at = click(at, "Measure routing under router-input noise (1%, 5%, 10%)")
    clean(at)
    assert any("most sensitive layer" in m.value for m in at.markdown)
    at.text_area(key="explore_edited_prompt").set_value(PROMPT.replace("add", "sub"))
    at = click(at, "Compare routing with the edit")
    clean(at)
    assert any("shared tokens are routed to different experts" in m.value for m in at.markdown)
    at = at.radio(key="explore_paths_scope").set_value("tokens matching a pattern").run()
    at = at.text_input(key="explore_pattern").set_value("([").run()
    clean(at)
    assert any("not a valid regular expression" in e for e in errors(at))
    at = at.text_input(key="explore_pattern").set_value("add").run()
    clean(at)
    assert any("chosen tokens of" in m.value for m in at.markdown)


def test_load_balance_splits_a_generation_into_prefill_and_decode(app):
    at = click(app.switch_page("app_pages/load_balance.py").run(), "Generate and split the load")
    clean(at)
    assert "Prefill against decode, layer 0" in headings(at)
    assert any("The dashed line marks where the prompt ends" in m.value for m in at.markdown)
