"""scripts/train_default_model.py (a shim over moe_viz.training.train_default) reproduces a
loadable model end to end (--quick), and its building blocks (corpus split, schedule, CLI
validation) behave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_viz.training import corpus as build_corpus
from moe_viz.training import train_default as train_default_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.slow
def test_quick_training_run_writes_a_model_that_plain_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, corpus = tmp_path / "model", tmp_path / "corpus"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "train_default_model.py"),
            "--quick",
            "--out",
            str(out),
            "--corpus",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "DATA_LICENSES.md",
        "generation_config.json",
    ):
        assert (out / name).exists(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["max_position_embeddings"] >= 2048

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("def f(x):\n    return 42", return_tensors="pt")
    with torch.no_grad():
        result = model(**ids, output_router_logits=True)
    assert len(result.router_logits) == model.config.num_hidden_layers
    assert result.router_logits[0].shape[-1] == model.config.num_local_experts
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "--quick" in card and "MI(domain; top-1 expert)" in card
    assert "### Balance phase" in card and "per_layer_balance_loss" in card  # both phases ran


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-steps", "0"],
        ["--max-minutes", "-1"],
        ["--batch-size", "0"],
        ["--lr", "2"],
        ["--aux-coef", "-0.1"],
        ["--threads", "0"],
    ],
)
def test_bad_training_arguments_raise_value_error(argv):
    with pytest.raises(ValueError):
        train_default_model.parse_args(argv)


def test_unknown_corpus_domain_raises_value_error():
    with pytest.raises(ValueError, match="unknown domain"):
        build_corpus.CorpusConfig(domains=("klingon",))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    spec = train_default_model.TrainSpec(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [train_default_model.lr_at(0.0, s, spec) for s in range(10)]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(1e-3)
    assert train_default_model.lr_at(0.5, 50, spec) < 1e-3
    assert train_default_model.lr_at(1.0, 100, spec) == pytest.approx(1e-4)
    assert train_default_model.lr_at(2.0, 100, spec) == pytest.approx(1e-4)


def test_validation_split_is_a_stable_minority_of_chunks():
    picks = [build_corpus.is_valid_chunk("prose", "doc", i, 40) for i in range(4000)]
    assert picks == [build_corpus.is_valid_chunk("prose", "doc", i, 40) for i in range(4000)]
    assert 0.01 < sum(picks) / len(picks) < 0.05


def test_chunks_keep_every_line_and_respect_the_size():
    text = "\n".join(f"line {i} " + "x" * (i % 50) for i in range(2000))
    chunks = build_corpus.chunk_text(text, 500)
    assert all(len(c) <= 500 for c in chunks)
    assert "\n".join(chunks) == text


def test_generated_numbers_domain_is_deterministic_and_correct():
    first = list(build_corpus.generate_numbers(20_000, seed=3))
    assert first == list(build_corpus.generate_numbers(20_000, seed=3))
    for line in first[0][1].splitlines():
        lhs, rhs = line.split(" = ")
        a, op, b = lhs.split(" ")
        assert eval(f"{a}{op}{b}") == int(rhs)  # noqa: S307  (our own generated digits)


def test_routing_stats_give_full_mutual_information_for_perfect_specialisation():
    import numpy as np

    # 2 domains, 4 experts; domain 0 always to expert 0, domain 1 always to expert 1.
    top1 = np.array([[[100, 0, 0, 0], [0, 100, 0, 0]]])  # (layers, domains, experts)
    topk = np.array([[[100, 100, 0, 0], [0, 100, 100, 0]]])
    stats = train_default_model.routing_stats(top1, topk, ["a", "b"], k=2)
    assert stats["mi_bits"][0] == pytest.approx(1.0)
    assert stats["busiest_over_fair"][0] == pytest.approx(2.0)  # expert 1: half of all picks


def test_per_layer_balance_loss_is_k_for_even_routing_and_larger_when_skewed():
    n_tokens, n_exp, k = 64, 8, 2
    # Even: token t picks experts 2t and 2t+1 (mod 8) with equal logits; every expert
    # gets exactly k/N of the picks and the same mean probability.
    even = torch.full((n_tokens, n_exp), -10.0)
    for t in range(n_tokens):
        even[t, (2 * t) % n_exp] = even[t, (2 * t + 1) % n_exp] = 5.0
    # Skewed: every token sends both picks to experts 0 and 1.
    skewed = torch.full((n_tokens, n_exp), -10.0)
    skewed[:, 0], skewed[:, 1] = 5.0, 4.0
    loss = train_default_model.per_layer_balance_loss
    assert float(loss([even, even], k)) == pytest.approx(k)
    assert float(loss([skewed], k)) > k + 5  # ~N: all load on 2 of 8 experts
    # Per layer, not pooled: a skewed layer is not hidden by another skewed the other way,
    # which the pooled transformers loss cannot tell from even routing.
    other = torch.full((n_tokens, n_exp), -10.0)
    other[:, 6], other[:, 7] = 5.0, 4.0
    assert float(loss([skewed, other], k)) > k + 5
    # Uniform router probabilities give exactly k whatever the tie-broken picks are.
    assert float(loss([torch.zeros(n_tokens, n_exp)], k)) == pytest.approx(k)


def test_balance_phase_options_are_validated_and_parsed():
    spec, _ = train_default_model.parse_args(
        ["--init-from", "x", "--skip-main", "--balance-minutes", "3", "--balance-aux-coef", "0.05"]
    )
    assert spec.skip_main and spec.init_from == Path("x")
    bal = train_default_model.balance_spec(spec.train)
    assert bal.aux_mode == "per-layer" and bal.max_minutes == 3 and bal.min_lr_ratio == 1.0
    assert train_default_model.lr_at(0.9, 100, bal) == pytest.approx(bal.lr)  # constant
    for argv in (
        ["--skip-main"],
        ["--balance-aux-coef", "-1"],
        ["--balance-steps", "-1"],
        ["--balance-minutes", "0"],
        ["--init-from", "x", "--skip-main", "--balance-steps", "0"],
    ):
        with pytest.raises(ValueError):
            train_default_model.parse_args(argv)
