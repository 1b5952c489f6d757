"""`moe-viz importance` and `moe-viz sweep` on the shipped default model: what they print, that their
CSV holds the library's numbers, and that bad values exit 2 with one line naming the value."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from moe_viz.cli import main
from moe_viz.importance import expert_importance
from moe_viz.models import DEFAULT_MODEL, load_model
from moe_viz.sweeps import DEFAULT_FACTORS, capacity_sweep, k_sweep

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_MODEL) / "config.json").is_file(),
    reason=f"default model not found in {DEFAULT_MODEL} (run `moe-viz train-default` or set MOE_VIZ_DEFAULT_MODEL)",
)

PROMPT = "The cat sat on the mat."
DEVICE = ["--device", "cpu"]  # the library side below runs on the CPU too, so the numbers match


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, device="cpu")


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def test_importance_command_prints_every_expert_and_writes_csv(model, tmp_path, capsys):
    out = tmp_path / "importance.csv"
    assert main(["importance", "default", "--prompt", PROMPT, "--mode", "zero", "--out", str(out), *DEVICE]) == 0
    printed = capsys.readouterr().out
    expected = expert_importance(model, PROMPT, mode="zero")
    table = read_csv(out)
    layers = [site.layer for site in model.sites]
    assert list(table.columns) == ["layer", "expert", "delta_loss", "importance", "load_share"]
    assert sorted(zip(table.layer, table.expert)) == [(la, e) for la in layers for e in range(model.num_experts)]
    merged = table.merge(expected.table, on=["layer", "expert"], suffixes=("", "_lib"))
    assert len(merged) == len(table)
    for column in ("delta_loss", "importance", "load_share"):
        assert merged[column].tolist() == pytest.approx(merged[column + "_lib"].tolist(), abs=1e-6)
    # per layer: the base loss once, every expert on its own line, largest importance first
    assert printed.count(f"base loss {expected.base_loss:.4f} nats") == len(layers)
    for layer in layers:
        block = printed.split(f"layer {layer}: ", 1)[1].split("\nlayer ", 1)[0]
        rho = expected.rank_correlation[layer]
        assert f"load share {rho:+.2f}" in block or rho != rho  # NaN is printed as n/a
        rows = [line.split() for line in block.splitlines()[2:] if line.startswith("  ")]
        ranked = expected.table[expected.table.layer == layer].sort_values(
            ["importance", "expert"], ascending=[False, True]
        )
        assert [int(r[0]) for r in rows] == ranked.expert.tolist()
        assert [r[2] for r in rows] == [f"{share:.1%}" for share in ranked.load_share]
    assert printed.rstrip().splitlines()[-2].startswith("This is one prompt")
    assert printed.rstrip().splitlines()[-1] == f"wrote {out}"


def test_capacity_sweep_command_writes_each_factor_with_its_per_layer_drops(model, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    args = ["sweep", "default", "--prompt", PROMPT, "--over", "capacity", "--factors", "0.5,1,4", "--out", str(out)]
    assert main([*args, *DEVICE]) == 0
    printed = capsys.readouterr().out
    effects, drops = capacity_sweep(model, PROMPT, factors=(0.5, 1.0, 4.0))
    table = read_csv(out)
    assert sorted(set(table.factor)) == [0.5, 1.0, 4.0]
    assert len(table) == 3 * len(model.sites)
    expected = drops.merge(effects, on="factor")
    assert list(table.columns) == list(expected.columns)
    for column in ("drop_rate", "capacity", "mean_kl", "flip_rate", "loss"):
        assert table[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)
    lines = printed.splitlines()
    for factor in ("0.5", "1", "4"):
        row = next(line.split() for line in lines if line.split()[:1] == [factor])
        rate = drops[drops.factor == float(factor)].drop_rate.mean()
        assert row[2] == f"{rate:.1%}"
    # without --factors the library's default factors run
    assert main(["sweep", "default", "--prompt", PROMPT, "--over", "capacity", *DEVICE]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [float(r[0]) for r in rows] == pytest.approx(list(DEFAULT_FACTORS), rel=1e-4)


def test_k_sweep_command_writes_one_row_per_k(model, tmp_path, capsys):
    out = tmp_path / "k.csv"
    assert main(["sweep", "default", "--prompt", PROMPT, "--over", "k", "--out", str(out), *DEVICE]) == 0
    printed = capsys.readouterr().out
    expected = k_sweep(model, PROMPT)
    table = read_csv(out)
    assert table.k.tolist() == list(range(1, model.num_experts + 1))
    for column in ("compute_share", "mean_kl", "flip_rate", "loss"):
        assert table[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-6)
    rows = [line.split() for line in printed.splitlines()[2:-1]]  # between the header and "wrote FILE"
    assert [(int(r[0]), r[1]) for r in rows] == [(k, f"{k / model.num_experts:.1%}") for k in table.k]
    assert [r[4] for r in rows] == [f"{loss:.4f}" for loss in expected.loss]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["importance", "default", "--prompt", PROMPT, "--mode", "bogus"], "'bogus'"),
        (["importance", "default", "--prompt", "   "], "--prompt"),
        (["importance", "default", "--prompt", PROMPT, "--out", "table.txt"], "'table.txt'"),
        (["importance", "./no-such-model-folder", "--prompt", PROMPT], "'./no-such-model-folder'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "capacity", "--factors", "a,b"], "'a,b'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "capacity", "--factors", "-1"], "'-1'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "capacity", "--factors", "1,inf"], "'1,inf'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "capacity", "--factors", "1,1"], "'1,1'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "depth"], "'depth'"),
        (["sweep", "default", "--prompt", PROMPT, "--over", "k", "--factors", "1,2"], "'1,2'"),
        (["sweep", "default", "--prompt", "", "--over", "k"], "--prompt"),
        (["sweep", "./no-such-model-folder", "--prompt", PROMPT, "--over", "k"], "'./no-such-model-folder'"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_value(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing is written, and ./no-such-model-folder does not exist
    assert main([*argv, *DEVICE]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("moe-viz: error: ") and captured.err.count("\n") == 1
    assert named in captured.err and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []
