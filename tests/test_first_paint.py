"""A browser's first visit to Explore sends the heatmap first and the rest once it is drawn
(``app/first_paint.py``); everything else gets the whole page at once.

AppTest runs no JavaScript: these tests play the beacon's part by setting what its callback sets.
``test_browser.py`` proves the beacon itself in Debian chromium.
"""

from __future__ import annotations

import json

import pytest
from apptest_helpers import APP, MODEL, clean, errors, needs_model

from app.first_paint import PAINTED

pytestmark = needs_model


def first_visit(monkeypatch, mode: str = "always", **env: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    monkeypatch.setenv("MOE_VIZ_FIRST_PAINT", mode)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AppTest.from_file(str(APP), default_timeout=180)


def charts(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def sidebar_widgets(at) -> int:
    return len(at.sidebar.radio) + len(at.sidebar.selectbox) + len(at.sidebar.slider)


def test_first_visit_sends_the_heatmap_alone_then_the_whole_page_with_the_same_heatmap(monkeypatch):
    at = first_visit(monkeypatch).run()  # the launcher has loaded the model: run once to load it here
    at = first_visit(monkeypatch).run()
    clean(at)
    assert [t.value for t in at.title] == ["Explore routing"]
    first = charts(at)
    assert len(first) == 1 and "Router probability per token and expert" in json.dumps(first[0]["layout"]["title"])
    assert sidebar_widgets(at) == 0 and not at.text_area and not at.metric  # the rest waits for the beacon
    assert at.get("bidi_component"), "the beacon that asks for the rest once the chart is drawn"
    assert PAINTED not in at.session_state

    at.session_state[PAINTED] = True  # what the beacon's callback sets once the browser has drawn the chart
    at.run()
    clean(at)
    assert sidebar_widgets(at) >= 2 and at.text_area and at.metric
    whole = charts(at)
    assert len(whole) >= 5 and whole[0] == first[0]  # the heatmap stays: same figure, same place
    assert not at.get("bidi_component")


def test_a_visit_without_a_browser_gets_the_whole_page_at_once(monkeypatch):
    """AppTest, scripts and the load clients send no browser user agent: no beacon would answer."""
    at = first_visit(monkeypatch, mode="auto").run()
    clean(at)
    assert sidebar_widgets(at) >= 2 and at.text_area and len(charts(at)) >= 5
    assert not at.get("bidi_component") and at.session_state[PAINTED]


def test_never_sends_the_whole_page_at_once(monkeypatch):
    at = first_visit(monkeypatch, mode="never").run()
    assert sidebar_widgets(at) >= 2 and len(charts(at)) >= 5


def test_a_first_run_that_fails_shows_its_error_on_the_whole_page(monkeypatch):
    """The default prompt is over this server's token limit: the page says so, with its sidebar."""
    at = first_visit(monkeypatch).run()
    at = first_visit(monkeypatch, MOE_VIZ_MAX_PROMPT_TOKENS="5").run()
    clean(at)
    assert any("5" in e and "token" in e for e in errors(at)), errors(at)
    assert sidebar_widgets(at) >= 2 and at.text_area  # the user can shorten the prompt right there
    assert not at.get("bidi_component")


def test_a_shared_link_and_other_pages_get_the_whole_page_at_once(monkeypatch):
    at = first_visit(monkeypatch).run()
    at = first_visit(monkeypatch)
    at.query_params["policy"] = "capacity:1.0"
    at.run()
    clean(at)
    assert sidebar_widgets(at) >= 2 and not at.get("bidi_component")
    assert any(m.value.startswith("Routing: `capacity") for m in at.markdown)

    at = first_visit(monkeypatch)
    at.switch_page("app_pages/load_balance.py").run()
    clean(at)
    assert sidebar_widgets(at) >= 2 and not at.get("bidi_component")
    at.switch_page("app_pages/explore.py").run()  # once the whole page has been sent, never the first chart alone
    assert sidebar_widgets(at) >= 2 and not at.get("bidi_component")


def test_an_unknown_first_paint_setting_is_refused_by_name(monkeypatch):
    from app.config import load_config

    monkeypatch.setenv("MOE_VIZ_FIRST_PAINT", "sometimes")
    with pytest.raises(ValueError, match="MOE_VIZ_FIRST_PAINT must be one of auto, always, never; got 'sometimes'"):
        load_config()
