"""Fuzz the page: hostile prompts and link parameters through AppTest give a page or a clear message,
never a traceback, in hosted mode."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hostile_inputs import HOSTILE  # noqa: E402

from moe_viz import DEFAULT_MODEL  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(), reason=f"no model at {MODEL}"),
]
POLICY_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "top-k:0",
            "top-k:99",
            "top-k:1",
            "capacity:-1",
            "capacity:nan",
            "capacity:1e9",
            "capacity:0.5:probs",
            "ensemble:gate",
            "ensemble:evil",
            "native",
            "capacity:1:k=0",
        ]
    ),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(prompt=HOSTILE, policy=POLICY_TEXT, page=st.sampled_from(["explore", "load_balance", "compare", "learn"]))
def test_hostile_prompts_and_links_never_raise_in_the_page(monkeypatch, prompt, policy, page):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    monkeypatch.setenv("MOE_VIZ_HOSTED", "1")
    monkeypatch.setenv("MOE_VIZ_MAX_PROMPT_TOKENS", "256")
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["prompt"] = prompt
    at.query_params["policy"] = policy
    at.run()
    if page != "explore":
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    for element in [*at.error, *at.warning]:
        assert element.value.strip(), "an empty message"
