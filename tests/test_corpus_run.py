"""Corpus runs on the default model: the aggregates are the sum of the per-prompt traces of the
same documents, an interrupted run resumes to the same result, and the same input gives the same
aggregates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import moe_viz
from moe_viz import Capacity, TopK, metrics, run_prompt
from moe_viz.corpus import aggregates, open_source, run_corpus
from moe_viz.corpus.run import chunk_documents

TEXTS = {
    "code": [
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
        "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n" * 3,
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    ],
    "scripture": [
        "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
        "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
    ],
    "numbers": ["3 + 4 = 7\n12 * 3 = 36\n100 - 58 = 42\n7 * 8 = 56\n" * 4, "Monday, March 3, 2025 is a Monday.\n"],
}


@pytest.fixture(scope="module")
def model() -> moe_viz.MoEModel:
    return moe_viz.load_model()


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for domain, docs in TEXTS.items():
        (root / domain).mkdir(parents=True)
        for i, text in enumerate(docs):
            (root / domain / f"{i:02d}.txt").write_text(text)
    return open_source(root)


def traces_to_counts(model, source, window, policy=None):
    """Per-prompt traces of every chunk, counted by hand with the metrics module."""
    chunks = list(chunk_documents(model, source.documents(), window))
    L, E = len(model.sites), model.num_experts
    domains = list(dict.fromkeys(c.doc.domain for c in chunks))
    assigned = np.zeros((L, len(domains), E), np.int64)
    first = np.zeros((L, len(domains), E), np.int64)
    dropped = np.zeros((L, len(domains), E), np.int64)
    pairs = np.zeros((L, E, E), np.int64)
    reuse = np.zeros((L, 4), np.int64)
    tokens = np.zeros(len(domains), np.int64)
    nll = np.zeros(len(domains))
    vocab = []
    for c in chunks:
        trace = run_prompt(model, c.ids, policy)
        d = domains.index(c.doc.domain)
        tokens[d] += trace.num_tokens
        nll[d] += -float(trace.output.target_logprob[:-1].double().sum()) if trace.num_tokens > 1 else 0.0
        for li, lt in enumerate(trace.layers):
            assigned[li, d] += np.bincount(lt.index.reshape(-1).numpy(), minlength=E)
            dropped[li, d] += np.bincount(lt.index[lt.dropped].numpy(), minlength=E)
            fc = metrics.first_choice(lt).numpy()
            first[li, d] += np.bincount(fc, minlength=E)
            sets = metrics.membership(lt).long()
            pairs[li] += (sets.t() @ sets).numpy()
            if trace.num_tokens > 1:
                r = metrics.reuse(lt)
                same, meet, overlap = r.first_choice_same, r.sets_intersect, r.mean_overlap
                reuse[li] += [r.pairs, round(same * r.pairs), round(meet * r.pairs), round(overlap * r.pairs)]
            vocab.append(pd.DataFrame({"layer": li, "token": c.ids, "expert": fc}))
    vocab = pd.concat(vocab).groupby(["layer", "token", "expert"]).size()
    return domains, dict(
        assigned=assigned, first=first, dropped=dropped, pairs=pairs, reuse=reuse, tokens=tokens, nll=nll, vocab=vocab
    )


@pytest.mark.parametrize("policy", [None, TopK(1), Capacity(0.5)], ids=["native", "top-1", "capacity-0.5"])
def test_corpus_aggregates_equal_the_sum_of_per_prompt_traces(model, corpus, policy):
    window = 48  # several documents are cut into chunks
    agg = run_corpus(model, corpus, policy, window=window, max_batch_chunks=1)
    domains, want = traces_to_counts(model, corpus, window, policy)
    agg = agg.with_domains(domains)
    assert np.array_equal(agg.assigned.sum(axis=0), want["assigned"])
    assert np.array_equal(agg.first.sum(axis=0), want["first"])
    assert np.array_equal(agg.dropped.sum(axis=0), want["dropped"])
    assert np.array_equal(agg.pairs.sum(axis=0), want["pairs"])
    assert np.array_equal(agg.reuse.sum(axis=(0, 2)), want["reuse"])
    assert np.array_equal(agg.tokens.sum(axis=0), want["tokens"])
    assert np.allclose(agg.nll.sum(axis=0), want["nll"], rtol=1e-3)  # padded batches: float rounding only
    got_vocab = agg.vocab["input"].groupby(["layer", "token", "expert"])["count"].sum()
    assert got_vocab.sort_index().to_dict() == want["vocab"].sort_index().to_dict()
    # per document: every document of the source has one row, its loads sum to the layer totals
    assert agg.docs["ordinal"].tolist() == list(range(sum(len(v) for v in TEXTS.values())))
    assert np.array_equal(agg.doc_loads.sum(axis=0), agg.assigned.sum(axis=(0, 2)))
    assert int(agg.docs["tokens"].sum()) == agg.total_tokens
    if policy is None:
        assert agg.dropped.sum() == 0
    if isinstance(policy, Capacity):
        assert agg.dropped.sum() > 0


@pytest.mark.parametrize("policy", [None, Capacity(0.5)], ids=["native", "capacity-0.5"])
def test_padded_batches_route_like_per_prompt_traces_up_to_rare_float_rounding_flips(model, corpus, policy):
    # The default model runs in bfloat16: a batch of several padded chunks rounds differently from
    # one chunk alone, which can flip a near-tie (and, under capacity, which token is dropped).
    agg = run_corpus(model, corpus, policy, window=48, token_budget=4 * 48)
    domains, want = traces_to_counts(model, corpus, 48, policy)
    moved = np.abs(agg.with_domains(domains).assigned.sum(axis=0) - want["assigned"]).sum() / 2
    assert moved <= 0.005 * want["assigned"].sum()
    assert agg.total_tokens == want["tokens"].sum()


def test_corpus_run_interrupted_and_resumed_equals_an_uninterrupted_run(model, corpus, tmp_path):
    window, budget = 32, 64
    whole = run_corpus(model, corpus, window=window, token_budget=budget, out=tmp_path / "whole")
    calls = []

    def stop_after_three(progress):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_corpus(
            model, corpus, window=window, token_budget=budget, out=out, checkpoint_every=2, progress=stop_after_three
        )
    saved = aggregates.load(out / "checkpoint")
    assert 0 < saved.chunks_done < whole.chunks_done  # it stopped part-way, after a checkpoint
    resumed = run_corpus(model, corpus, window=window, token_budget=budget, out=out, checkpoint_every=2)
    assert aggregates.equal(resumed, whole)
    assert aggregates.equal(aggregates.load(out / "aggregates"), whole)


def test_same_input_and_seed_give_the_same_aggregates(model, corpus, tmp_path):
    a = run_corpus(model, corpus, window=40, token_budget=160, seed=3, importance_every=3)
    b = run_corpus(model, corpus, window=40, token_budget=160, seed=3, importance_every=3)
    assert aggregates.equal(a, b)
    assert a.meta.importance_docs == 3  # documents 0, 3 and 6 of 7 (seed 3 -> offset 0)
    assert a.importance_scored.sum() > 0


def test_resuming_with_other_settings_is_refused_with_the_settings_that_differ(model, corpus, tmp_path):
    run_corpus(model, corpus, window=40, out=tmp_path / "run")
    with pytest.raises(ValueError, match="window"):
        run_corpus(model, corpus, window=32, out=tmp_path / "run")
    run_corpus(model, corpus, window=32, out=tmp_path / "run", resume=False)  # starting over is allowed
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["window"] == 32


def test_saturation_against_the_same_checkpoint_is_complete(model, corpus):
    agg = run_corpus(model, corpus, window=64, reference=model)
    sat = agg.saturation.sum(axis=0)  # (L, 3)
    k = np.array(agg.meta.native_top_k)
    assert np.array_equal(sat[:, 0], sat[:, 2] * k)  # every native expert is also the reference's
    assert np.array_equal(sat[:, 1], sat[:, 2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=1), "window must satisfy"),
        (dict(window=64, token_budget=10), "token_budget must be at least"),
    ],
)
def test_bad_run_settings_give_a_message_naming_the_argument(model, corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_corpus(model, corpus, **kwargs)


def test_every_token_of_every_document_is_counted_once(model, corpus):
    agg = run_corpus(model, corpus, window=24, token_budget=24)
    expected = sum(len(model.tokenizer(t)["input_ids"]) for docs in TEXTS.values() for t in docs)
    assert agg.total_tokens == expected
    assert int(agg.reuse[:, 0, :, 0].sum()) == expected - agg.chunks_done  # consecutive pairs stay inside chunks
    assert torch.equal(torch.tensor(agg.positions.sum(axis=(1, 2))), torch.tensor(agg.assigned.sum(axis=(0, 2, 3))))


def test_starting_over_discards_the_old_checkpoint_even_when_the_new_run_stops_early(model, corpus, tmp_path):
    run_corpus(model, corpus, window=40, out=tmp_path / "run")
    other = tmp_path / "other"
    (other / "d").mkdir(parents=True)
    (other / "d" / "a.txt").write_text("one two three four five six seven eight nine ten")
    source = open_source(other)

    def stop(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_corpus(model, source, window=40, out=tmp_path / "run", resume=False, progress=stop)
    again = run_corpus(model, source, window=40, out=tmp_path / "run")
    assert aggregates.equal(again, run_corpus(model, source, window=40))  # nothing of the first corpus


def test_resuming_after_the_documents_changed_is_refused(model, corpus, tmp_path):
    run_corpus(model, corpus, window=40, out=tmp_path / "run")
    first = next(p for p in sorted(corpus.path.rglob("*.txt")))
    first.write_text(first.read_text() + "\nan edit")
    with pytest.raises(ValueError, match="source_fingerprint"):
        run_corpus(model, corpus, window=40, out=tmp_path / "run")


def test_saturation_and_importance_need_native_routing(model, corpus):
    with pytest.raises(ValueError, match="router saturation compares the two checkpoints' own"):
        run_corpus(model, corpus, TopK(1), reference=model)
    with pytest.raises(ValueError, match="causal importance ablates experts under the model's own"):
        run_corpus(model, corpus, Capacity(1.0), importance_every=2)


def test_a_bad_row_after_the_first_and_an_oversized_corpus_are_value_errors(model, tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"text": "fine"}\n{"body": "no text column"}\n')
    source = open_source(table)  # the first row reads
    with pytest.raises(ValueError, match="no text column 'text' at line 2"):
        run_corpus(model, source)
    big = tmp_path / "big.txt"
    big.write_text("word " * 5000)
    with pytest.raises(ValueError, match="more than 1,000 characters"):
        open_source(big, max_chars=1000)
    with pytest.raises(ValueError, match="more than 100 tokens long"):
        run_corpus(model, open_source(big), max_tokens=100)
