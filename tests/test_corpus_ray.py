"""Corpus runs on a Ray Data actor pool (two local workers) give the in-process run's aggregates,
count for count; a missing Ray gives the install command; bad pool settings name the argument."""

from __future__ import annotations

import builtins
import logging

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ray")

import ray  # noqa: E402

import moe_viz  # noqa: E402
from moe_viz import Capacity  # noqa: E402
from moe_viz.cli import main  # noqa: E402
from moe_viz.corpus import aggregates, distributed, open_source, run_corpus  # noqa: E402
from moe_viz.corpus.distributed import run_corpus_ray  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),  # Ray's own deprecated options
]

TEXTS = {  # small: the whole module stays well under a minute on 2 CPU cores
    "code": [
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
        "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n" * 3,
    ],
    "scripture": [
        "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
        "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
    ],
    "numbers": ["3 + 4 = 7\n12 * 3 = 36\n100 - 58 = 42\n7 * 8 = 56\n" * 4, "Monday, March 3, 2025 is a Monday.\n"],
}
INTEGER_COUNTS = ("assigned", "dropped", "first", "tokens", "scored", "pairs", "adjacent", "reuse", "positions")
INTEGER_COUNTS += ("first_seen", "saturation", "importance_scored", "doc_loads")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model() -> moe_viz.MoEModel:
    return moe_viz.load_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "corpus"
    for domain, docs in TEXTS.items():
        (root / domain).mkdir(parents=True)
        for i, text in enumerate(docs):
            (root / domain / f"{i:02d}.txt").write_text(text)
    return open_source(root)


def assert_same_counts(got: aggregates.CorpusAggregates, want: aggregates.CorpusAggregates) -> None:
    """Every integer count equal, float sums equal up to summation order, the same per-document and
    per-token tables."""
    assert got.meta == want.meta and got.domains == want.domains
    for name in INTEGER_COUNTS:
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    for name in ("nll", "importance"):
        assert np.allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-9), name
    pd.testing.assert_frame_equal(got.docs.reset_index(drop=True), want.docs.reset_index(drop=True))
    for kind in aggregates.VOCAB_KINDS:
        pd.testing.assert_frame_equal(
            got.vocab[kind].reset_index(drop=True), want.vocab[kind].reset_index(drop=True), check_exact=True
        )
    assert (got.chunks_done, got.documents_done) == (want.chunks_done, want.documents_done)
    assert aggregates.equal(got, want)


def test_two_ray_workers_give_the_in_process_counts_with_importance_and_saturation(local_ray, model, corpus, tmp_path):
    # window 32 cuts documents across batches and shards; budget 96 packs up to 3 chunks a batch
    settings = dict(window=32, token_budget=96, seed=1, importance_every=3)
    want = run_corpus(model, corpus, reference=model, **settings)
    seen = []
    got = run_corpus_ray(
        None, corpus, workers=2, reference_id="default", out=tmp_path / "run", progress=seen.append, **settings
    )
    assert_same_counts(got, want)
    assert want.meta.importance_docs > 0 and want.saturation.sum() > 0
    assert seen[-1].documents_done == seen[-1].documents_total == 6 and seen[-1].tokens_done == want.total_tokens
    assert aggregates.equal(aggregates.load(tmp_path / "run" / "aggregates"), want)
    # resume is per whole run: the finished run is returned as it is; other settings are refused
    again = run_corpus_ray(None, corpus, workers=2, reference_id="default", out=tmp_path / "run", **settings)
    assert aggregates.equal(again, want)
    with pytest.raises(ValueError, match="window differ"):
        run_corpus_ray(
            None, corpus, workers=2, reference_id="default", out=tmp_path / "run", **{**settings, "window": 40}
        )


def test_two_ray_workers_give_the_in_process_counts_under_capacity_and_leave_ray_running(local_ray, model, corpus):
    settings = dict(window=24, token_budget=72, max_documents=5)
    want = run_corpus(model, corpus, Capacity(0.5), **settings)
    got = run_corpus_ray(None, corpus, Capacity(0.5), workers=2, **settings)
    assert want.dropped.sum() > 0
    assert_same_counts(got, want)
    assert ray.is_initialized()  # the caller started it: the caller shuts it down


def test_cli_ray_engine_gives_a_policy_the_model_cannot_run_as_one_line_from_the_workers(
    local_ray, corpus, tmp_path, capsys
):
    # the driver cannot check the policy (it loads no model): the worker's ValueError comes back plainly
    args = ["corpus", "default", str(corpus.path), "--out", str(tmp_path / "o"), "--engine", "ray", "--workers", "1"]
    assert main([*args, "--policy", "top-k:99", "--window", "32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-viz")]
    assert len(err) == 1 and "1 <= k <= 8" in err[0], err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2"], "--workers: only for --engine ray; got --engine local"),
        (["--engine", "ray", "--workers", "0"], "--workers must be an integer >= 1; got 0"),
    ],
)
def test_cli_pool_options_are_checked_before_any_run(corpus, tmp_path, capsys, args, message):
    assert main(["corpus", "default", str(corpus.path), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_ray_gives_the_install_command(monkeypatch, corpus):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"pip install 'moe-viz\[distributed\]'"):
        run_corpus_ray(None, corpus)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(workers=0), "workers must be an integer >= 1; got 0"),
        (dict(workers=1.5), "workers must be an integer >= 1"),
        (dict(gpus_per_worker=-1), "gpus_per_worker must be a number >= 0"),
        (dict(cpus_per_worker=0), "cpus_per_worker must be a number > 0"),
        (dict(window=1), "window must satisfy 2 <= window <= 4096; got 1"),
        (dict(window=64, token_budget=10), "token_budget must be at least the window"),
        (dict(policy=Capacity(1.0), importance_every=2), "causal importance ablates experts"),
        (dict(max_tokens=10), "more than 10 tokens long"),
    ],
)
def test_bad_arguments_are_refused_before_ray_starts_naming_the_argument(corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_corpus_ray(None, corpus, **kwargs)


def test_shards_are_contiguous_and_cover_every_batch_once(model, corpus):
    shards = distributed.plan_shards(
        model.tokenizer,
        corpus,
        4,
        window=24,
        token_budget=48,
        max_batch_chunks=None,
        max_documents=None,
        max_tokens=None,
    )
    assert [s.index for s in shards] == list(range(len(shards))) and len(shards) == 4
    places = [p for s in shards for batch in s.batches for p in batch]
    assert [(p.ordinal, p.start) for p in places] == sorted((p.ordinal, p.start) for p in places)
    assert sum(s.tokens for s in shards) == sum(p.length for p in places)
    assert sum(s.documents_finished for s in shards) == 6
