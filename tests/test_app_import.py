"""AppTest of the Import page: an engine's routing file shows every view expert ids allow, says
which views need scores, compares with the model's own routing, turns count dumps into the
corpus views, refuses a bad file with a message, and follows the hosted limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from apptest_helpers import APP, MODEL, clean, click, errors, headings, needs_model

from app.config import DEFAULT_PROMPT
from moe_viz import load_model, run_prompt

pytestmark = needs_model


@pytest.fixture(scope="module")
def computed():
    return run_prompt(load_model(MODEL), DEFAULT_PROMPT)


def vllm_file(trace, folder: Path, change_tokens: tuple[int, ...] = ()) -> Path:
    """The trace's routing as vLLM 0.22+ writes it: (T - 1, layers, k) uint8, the last token unrouted."""
    ids = np.stack([lt.native_index.numpy() for lt in trace.layers], axis=1)[:-1].astype(np.uint8)
    for t in change_tokens:  # another engine's kernels picked a different second expert
        ids[t, 0, 1] = next(e for e in range(8) if e not in ids[t, 0])
    path = folder / "routed_experts.npy"
    np.save(path, ids)
    return path


def start(monkeypatch, **env):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(APP), default_timeout=240).run()
    return at.switch_page("app_pages/import_routing.py").run()


def import_path(at, fmt: str, path: Path, ids: list[int] | None = None):
    at.selectbox(key="import_format").set_value(fmt).run()
    at.text_input(key="import_path").set_value(str(path))
    if ids is not None:
        at.text_area(key="import_token_ids").set_value(" ".join(map(str, ids)))
    return click(at, "Import")


def test_import_page_shows_a_vllm_file_with_every_view_ids_allow_and_says_what_needs_scores(
    monkeypatch, tmp_path, computed
):
    at = import_path(start(monkeypatch), "vllm", vllm_file(computed, tmp_path), computed.token_ids)
    clean(at)
    assert not errors(at), errors(at)
    shown = set(headings(at))
    assert {"Token × expert routing, layer 0", "Layer × expert load", "Expert paths across layers"} <= shown
    assert "Agreement with moe-viz's own routing" in shown
    infos = " ".join(i.value for i in at.info)
    assert "router's scores" in infos and "next-token predictions" in infos
    assert any("the last token has no routing" in c.value for c in at.caption)
    at = click(at, "Recompute and compare")
    clean(at)
    agreement = next(m.value for m in at.markdown if "overlap of the experts" in m.value)
    assert "identical in all 4 layers" in agreement
    at.selectbox(key="import_layer").set_value(2).run()  # the comparison stays while other widgets change
    clean(at)
    assert "Tokens routed differently, layer 2" in headings(at)
    assert any("all" in m.value and "go to the same experts in both routings" in m.value for m in at.markdown)


def test_import_page_finds_the_tokens_an_altered_file_routes_differently(monkeypatch, tmp_path, computed):
    path = vllm_file(computed, tmp_path, change_tokens=(2, 5))
    at = import_path(start(monkeypatch), "vllm", path, computed.token_ids)
    at = click(at, "Recompute and compare")
    clean(at)
    assert "Tokens routed differently, layer 0" in headings(at)
    assert any(
        m.value.startswith("2 of ") and "processed by a different set of experts" in m.value for m in at.markdown
    )
    assert any("They differ in 1 of 4 layers; agreement is lowest in layer 0" in m.value for m in at.markdown)


def test_import_page_turns_a_sglang_stat_dump_into_the_count_views(monkeypatch, tmp_path):
    counts = torch.randint(0, 9, (12, 4, 8), dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, tmp_path / "d.pt")
    at = import_path(start(monkeypatch), "sglang-dump", tmp_path / "d.pt")
    clean(at)
    assert not errors(at), errors(at)
    assert {"Expert counts", "Layer × expert load", "Coverage curves"} <= set(headings(at))


def test_import_page_refuses_a_bad_file_or_bad_token_ids_with_a_message(monkeypatch, tmp_path, computed):
    bad = tmp_path / "routed.npy"
    bad.write_bytes(b"not an array")
    at = import_path(start(monkeypatch), "vllm", bad)
    clean(at)
    assert any("is not a readable .npy array" in e for e in errors(at)), errors(at)
    at = import_path(at, "vllm", vllm_file(computed, tmp_path), None)
    at.text_area(key="import_token_ids").set_value("1 2 three")
    at = click(at, "Import")
    clean(at)
    assert any("token ids must be non-negative integers" in e for e in errors(at)), errors(at)


def test_hosted_import_page_takes_uploads_only_and_can_be_switched_off(monkeypatch):
    at = start(monkeypatch, MOE_VIZ_HOSTED="1")
    clean(at)
    assert not [t for t in at.text_input if t.key == "import_path"]
    off = start(monkeypatch, MOE_VIZ_HOSTED="1", MOE_VIZ_MAX_IMPORT_UPLOAD_MB="0")
    clean(off)
    assert any("Importing is off on this server" in i.value for i in off.info)
