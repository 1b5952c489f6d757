"""Hosted mode: allow-listed models only, no local paths or remote code, enforced and visible limits,
and sessions that never see each other's prompt, policy, trace or downloads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moe_viz import DEFAULT_MODEL, load_model, parse_policy, run_prompt, trace_io  # noqa: E402
from moe_viz.views import run_summary  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
TIMEOUT = 120
HAS_MODEL = (Path(MODEL) / "config.json").is_file()


@pytest.fixture()
def hosted(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOE_VIZ_") and name != "MOE_VIZ_MODEL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    monkeypatch.setenv("MOE_VIZ_HOSTED", "1")
    return monkeypatch


def _config():
    from app.config import load_config

    return load_config()


def test_hosted_mode_refuses_local_paths_unlisted_ids_and_remote_code(hosted):
    hosted.setenv("MOE_VIZ_ALLOWED_MODELS", "allenai/OLMoE-1B-7B-0924, Qwen/Qwen1.5-MoE-A2.7B")
    cfg = _config()
    cfg.check_model_request(MODEL)  # the default model, always
    cfg.check_model_request("allenai/OLMoE-1B-7B-0924")
    for name, trust, message in [
        ("/etc", False, "does not load local folders"),
        ("./assets/moe-viz-mini", False, "does not load local folders"),
        ("~/models/x", False, "does not load local folders"),
        ("someone/evil-moe", False, "not on this server's allow-list"),
        ("allenai/OLMoE-1B-7B-0924", True, "trust_remote_code is refused"),
    ]:
        with pytest.raises(ValueError, match=message):
            cfg.check_model_request(name, trust)


def test_hosted_mode_without_an_allow_list_serves_the_default_model_only(hosted):
    cfg = _config()
    assert not cfg.allow_custom_models
    with pytest.raises(ValueError, match="only runs its default model"):
        cfg.check_model_request("allenai/OLMoE-1B-7B-0924")


def test_hosted_defaults_bound_every_request(hosted):
    cfg = _config()
    assert (cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.compute_slots, cfg.traces_per_session) == (512, 32, 2, 6)
    assert cfg.time_budget_s == 30 and cfg.max_ensemble_experts == 64
    assert cfg.torch_threads == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(ValueError, match="capacity factor must satisfy 0.1 <= factor <= 4"):
        cfg.limits.check_policy(parse_policy("capacity:8"), 8)


def test_local_mode_limits_nothing_beyond_sanity(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MOE_VIZ_"):
            monkeypatch.delenv(name)
    cfg = _config()
    assert not cfg.hosted and cfg.compute_slots is None and cfg.time_budget_s is None
    assert cfg.torch_threads == max(1, (os.cpu_count() or 1) - 2)  # two cores left to the browser and server
    cfg.check_model_request("/any/local/folder", trust_remote_code=True)


def test_bad_environment_values_name_the_variable(hosted):
    hosted.setenv("MOE_VIZ_TIME_BUDGET_S", "soon")
    with pytest.raises(ValueError, match="MOE_VIZ_TIME_BUDGET_S must be a number"):
        _config()


needs_model = pytest.mark.skipif(not HAS_MODEL, reason=f"no model at {MODEL}")


def _run(query: dict[str, str] | None = None, prompt: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    if prompt is not None:
        at.session_state["prompt"] = prompt
    return at.run()


def _summary(at) -> str:
    found = [c.value for c in at.caption if c.value.startswith("Run summary:")]
    assert found, "no run summary on the page"
    return found[0]


@needs_model
def test_hosted_page_shows_its_limits_and_offers_no_folder_box(hosted):
    at = _run()
    assert not at.exception
    assert not [t for t in at.text_input if "folder" in t.label.lower()]
    tables = [t.value for t in at.table if "setting" in t.value.columns]
    assert tables, "the server limits are not shown"
    shown = tables[0].to_dict("list")
    assert "prompt tokens" in shown["setting"] and "512" in shown["value"]


@needs_model
def test_hosted_page_refuses_a_prompt_over_the_token_limit(hosted):
    hosted.setenv("MOE_VIZ_MAX_PROMPT_TOKENS", "8")
    at = _run(prompt="one two three four five six seven eight nine ten eleven twelve")
    assert not at.exception
    assert any("the limit is 8 tokens" in e.value for e in at.error)


@needs_model
def test_two_sessions_never_see_each_others_prompt_policy_trace_or_downloads(hosted):
    a_prompt, a_policy = "def add(a, b): return a + b", "capacity:0.5:probs"
    b_prompt, b_policy = "In the beginning was the Word.", "ensemble:uniform"
    a = _run({"prompt": a_prompt, "policy": a_policy})
    b = _run({"prompt": b_prompt, "policy": b_policy})
    model = load_model(MODEL)
    assert _summary(a) == run_summary(run_prompt(model, a_prompt, parse_policy(a_policy)))
    assert _summary(b) == run_summary(run_prompt(model, b_prompt, parse_policy(b_policy)))
    a_json = next(d for d in a.get("download_button") if "json" in str(d.proto.label).lower())
    b_json = next(d for d in b.get("download_button") if "json" in str(d.proto.label).lower())
    assert a_json.proto.deferred_file_id != b_json.proto.deferred_file_id  # each session's own file
    # The download buttons serialise the session's own traces; each session holds only its own.
    a_traces, b_traces = a.session_state["traces"], b.session_state["traces"]
    assert [key[1:] for key in a_traces] == [(a_prompt, parse_policy(a_policy).spec)]
    assert [key[1:] for key in b_traces] == [(b_prompt, parse_policy(b_policy).spec)]
    assert json.loads(trace_io.to_json_text(next(iter(a_traces.values()))))["meta"]["prompt"] == a_prompt
    assert a.session_state["prompt"] == a_prompt and b.session_state["prompt"] == b_prompt


def test_a_link_with_a_bad_policy_is_reported_not_raised(hosted):
    if not HAS_MODEL:
        pytest.skip(f"no model at {MODEL}")
    at = _run({"policy": "top-k:zero"})
    assert not at.exception
    assert any("Ignored the link's policy" in w.value for w in at.warning)


@pytest.mark.skipif(not HAS_MODEL, reason=f"no model at {MODEL}")
def test_a_sessions_byte_budget_drops_its_oldest_trace_and_the_page_says_so(hosted):
    from streamlit.testing.v1 import AppTest

    assert _config().session_mb == 64  # the hosted default
    assert ("memory per session", "64 MiB of traces (oldest dropped first)") in _config().limit_rows()
    # the default model's traces hold their bf16 hidden states and router scores: ~0.04 MiB at 26
    # tokens, ~0.6 MiB at 600
    hosted.setenv("MOE_VIZ_SESSION_MB", "1")
    hosted.setenv("MOE_VIZ_MAX_PROMPT_TOKENS", "2048")
    hosted.setenv("MOE_VIZ_MAX_PROMPT_CHARS", "20000")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at = at.switch_page("app_pages/load_balance.py").run()  # a page that holds one trace per run
    [first_key] = list(at.session_state["traces"])
    long_prompt = (
        "A long prompt: the router sends every token of it to two of the eight experts, layer after layer, and "
        "the session can hold only one prompt this long within its budget. "
    ) * 12

    def run(prompt: str) -> AppTest:
        at.text_area(key="prompt_input_balance").set_value(prompt)
        done = next(b for b in at.button if b.label == "Run").click().run()
        assert not done.exception
        return done

    at = run(long_prompt)
    assert len(at.session_state["traces"]) == 2  # the short and the long trace fit in 1 MiB together
    assert not [i for i in at.info if "older trace" in i.value]
    [_, second_key] = list(at.session_state["traces"])
    at = run("Another " + long_prompt)
    traces = at.session_state["traces"]
    assert first_key not in traces and second_key not in traces and len(traces) == 1  # the oldest went first
    assert sum(t.nbytes() for t in traces.values()) <= 1 * 2**20
    assert any("To keep this session within 1 MiB, 2 older traces were dropped" in i.value for i in at.info)


def test_a_session_that_leaves_frees_its_traces_and_their_statistics(hosted):
    import gc
    import weakref

    from streamlit.testing.v1 import AppTest

    from moe_viz._cache import STATS

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    for page in ("app_pages/explore.py", "app_pages/load_balance.py", "app_pages/compare.py"):
        at = at.switch_page(page).run()
        assert not at.exception, page
    traces = list(at.session_state["traces"].values())
    assert len(traces) >= 3  # native and the compared modes
    assert traces[0].output.top_ids is not None  # predictions were computed
    with_session = len(STATS)  # traces with cached statistics (balance table, mode effects ...)
    alive = [weakref.ref(t) for t in traces]
    del at, traces
    gc.collect()
    assert [r for r in alive if r() is not None] == []  # nothing outside the session kept a trace
    assert len(STATS) < with_session  # and their cached statistics went with them
