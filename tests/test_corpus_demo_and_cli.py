"""The shipped demo corpus on the default model shows domain specialisation beyond chance, and
``moe-viz corpus`` writes Parquet aggregates and a JSON report that read back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import moe_viz
from moe_viz.cli import main
from moe_viz.corpus import aggregates, demo_corpus_path, open_source, run_corpus
from moe_viz.corpus.report import corpus_report


@pytest.fixture(scope="module")
def demo_report():
    agg = run_corpus(moe_viz.load_model(), open_source(demo_corpus_path()))
    return agg, corpus_report(agg)


def test_demo_corpus_shows_domain_information_with_an_interval_above_zero_and_above_chance(demo_report):
    agg, report = demo_report
    assert len(report.domain.domains) == 7 and report.documents == 84
    mi = report.domain.mi_bits
    assert (mi.low > 0).all(), mi.low  # every layer's interval excludes 0 ...
    assert (mi.low > report.domain.mi_null_95).all(), (mi.low, report.domain.mi_null_95)  # ... and chance


def test_demo_corpus_report_has_every_statistic_and_is_plain_json(demo_report):
    _, report = demo_report
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    expected = {"domain", "loss", "balance", "vocabulary", "coactivation", "coactivation_adjacent", "reuse"}
    assert expected | {"coverage", "dormant"} <= set(data)
    assert set(data["vocabulary"]) == {"input", "target", "predicted"}
    assert np.all(np.diff(np.asarray(data["coverage"]["curve"]["value"]), axis=1) >= 0)


def write_corpus(folder):
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    (folder / "a" / "1.txt").write_text("def f(x):\n    return x * 2\n" * 5)
    (folder / "a" / "2.txt").write_text("import sys\nprint(sys.argv)\n" * 4)
    (folder / "b" / "1.txt").write_text("And it was so. And the evening and the morning were the third day. " * 3)


def test_cli_corpus_writes_parquet_aggregates_and_a_json_report(tmp_path, capsys):
    write_corpus(tmp_path / "c")
    out = tmp_path / "out"
    assert main(["corpus", "default", str(tmp_path / "c"), "--out", str(out), "--replicates", "20"]) == 0
    printed = capsys.readouterr().out
    assert "tokens in 3 documents, domains: a, b" in printed and "MI(domain;expert)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["documents"] == 3 and report["replicates"] == 20
    routing = pd.read_parquet(out / "aggregates" / "routing_assigned.parquet")
    assert set(routing.columns) == {"group", "layer", "domain", "expert", "count"}
    agg = aggregates.load(out / "aggregates")
    assert int(routing["count"].sum()) == agg.total_tokens * 2 * len(agg.meta.layers)  # k = 2 in every layer
    # A second call with the same settings resumes from the finished checkpoint: same counts.
    assert main(["corpus", "default", str(tmp_path / "c"), "--out", str(out), "--replicates", "20"]) == 0
    assert aggregates.equal(aggregates.load(out / "aggregates"), agg)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "top-k:99"], "1 <= k <= 8"),
        (["--domain-column", "topic"], "corpus source"),
        (["--replicates", "5"], "--replicates must be an integer >= 10"),
    ],
)
def test_cli_corpus_bad_values_exit_2_with_one_line(tmp_path, capsys, args, message):
    write_corpus(tmp_path / "c")
    table = tmp_path / "t.jsonl"
    table.write_text('{"text": "hello there"}\n')
    source = str(table) if "--domain-column" in args else str(tmp_path / "c")
    assert main(["corpus", "default", source, "--out", str(tmp_path / "o"), *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-viz")]
    assert len(err) == 1 and message in err[0], err  # one line, no traceback
