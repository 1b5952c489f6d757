"""``moe-viz import``: an engine's routing file becomes a trace file or corpus aggregates, compared
with the model's own routing on request; bad input exits 2 with one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_viz import DEFAULT_MODEL, load_model, metrics, run_prompt, trace_io
from moe_viz.cli import main
from moe_viz.corpus import aggregates

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
pytestmark = pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(), reason=f"no model at {MODEL}")
TEXT = "An engine served this prompt and kept its experts."


@pytest.fixture(scope="module")
def computed():
    return run_prompt(load_model(MODEL), TEXT)


def test_import_writes_the_engines_routing_as_a_trace_and_compares_it_with_the_model(tmp_path, computed, capsys):
    ids = np.stack([lt.native_index.numpy() for lt in computed.layers], axis=1)[:-1].astype(np.int32)  # vLLM 0.14
    np.save(tmp_path / "r.npy", ids)
    token_ids = ",".join(map(str, computed.token_ids))
    out = tmp_path / "t.parquet"
    argv = ["import", "vllm", str(tmp_path / "r.npy"), "--model", MODEL, "--token-ids", token_ids, "--out", str(out)]
    assert main([*argv, "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "note: the last token has no routing" in printed or "sequence 0" in printed
    assert printed.count("100.0%") == 2 * len(computed.layers)  # overlap and top-1 match, every layer
    trace = trace_io.load_parquet(out)
    assert trace.token_ids == computed.token_ids[:-1] and trace.tokens == computed.tokens[:-1]
    for lt, want in zip(trace.layers, computed.layers, strict=True):
        assert metrics.membership(lt).equal(metrics.membership(want)[:-1])


def test_import_writes_a_count_dump_as_corpus_aggregates(tmp_path, capsys):
    counts = torch.randint(0, 9, (5, 4, 8), dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, tmp_path / "s.pt")
    assert (
        main(["import", "sglang-dump", str(tmp_path / "s.pt"), "--top-k", "2", "--counts-out", str(tmp_path / "a")])
        == 0
    )
    agg = aggregates.load(tmp_path / "a")
    assert np.array_equal(agg.assigned.sum(axis=(0, 2)), counts.sum(dim=0).numpy())
    assert "counts: 5 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["import", "nope", "x"], "format must be one of"),
        (["import", "vllm", "missing.npy", "--out", "t.parquet"], "does not exist"),
        (["import", "vllm", "r.npy", "--out", "t.txt"], "--out must end in .parquet or .json"),
        (["import", "vllm", "r.npy", "--compare"], "--compare needs --model"),
        (["import", "vllm", "r.npy"], "say what to do with the import"),
        (
            ["import", "vllm", "r.npy", "--token-ids", "1,x", "--out", "t.json"],
            "--token-ids must be non-negative integers",
        ),
    ],
)
def test_import_with_bad_arguments_exits_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "r.npy", np.zeros((3, 2, 2), np.int32) + np.array([0, 1]))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
