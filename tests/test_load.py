"""Load and isolation: 16 concurrent sessions on one hosted-mode server, each with its own prompt and
policy, each get exactly the result a lone session gets. Speaks Streamlit's own websocket protocol."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from load_scenarios import HOSTED_ENV, MODEL, query, references, scenarios
from streamlit_client import Server, run_sessions

pytestmark = pytest.mark.slow
SESSIONS = 16

if not (Path(MODEL) / "config.json").is_file():
    pytest.skip(f"no model at {MODEL}", allow_module_level=True)


def test_sixteen_concurrent_sessions_each_get_their_own_correct_result():
    pairs = scenarios(SESSIONS)
    expected = references(pairs)
    assert len(set(expected)) == SESSIONS  # every session's answer is distinguishable
    with Server(env=HOSTED_ENV) as server:
        results = asyncio.run(run_sessions(server.port, [query(p, s) for p, s in pairs]))
    for result, want in zip(results, expected):
        assert result.finished, f"{result.query}: the script run did not finish"
        assert result.exceptions == [], result.exceptions
        assert result.find("Run summary:") == want, result.query
