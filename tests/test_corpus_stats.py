"""Corpus statistics (moe_viz.corpus.stats) on aggregates built by hand, each with a known answer.

No model is run: the counts a corpus run would keep are written straight into ``empty(meta, domains)``
arrays, so every expected value can be worked out on paper. The last part simulates routing with a
known true value (documents with their own share of expert 0, drawn around a known mean) over many
independent corpora and checks that the bootstrap's 95% intervals cover the truth about 95% of the
time (``pytest -s`` prints the measured coverage).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from moe_viz.corpus import aggregates, report, stats
from moe_viz.corpus.aggregates import CorpusAggregates, CorpusMeta, empty
from moe_viz.corpus.report import corpus_report, write_report
from moe_viz.metrics import reuse_baselines
from moe_viz.views import array_values


# ------------------------------------------------------------------------------------ helpers
def make_meta(
    num_experts: int = 4,
    top_k: tuple[int, ...] = (1,),
    layers: tuple[int, ...] = (0,),
    groups: int = 4,
    window: int = 16,
    vocab_size: int = 100,
) -> CorpusMeta:
    return CorpusMeta(
        model_id="synthetic/moe",
        policy="native",
        layers=layers,
        num_experts=num_experts,
        top_k=top_k,
        vocab_size=vocab_size,
        window=window,
        groups=groups,
        position_bucket=4,
    )


def corpus_from_documents(
    meta: CorpusMeta, domains: list[str], doc_domain: np.ndarray, doc_loads: np.ndarray
) -> CorpusAggregates:
    """Top-1 aggregates of documents given by their domain index (N,) and per-layer expert loads
    (N, L, E) (each layer's loads sum to the document's tokens). Document n goes to group n mod G;
    every count a top-1 run keeps about routing per domain, per group and per document is filled
    consistently (first choice = the one expert; pairs hold only the diagonal)."""
    assert all(k == 1 for k in meta.top_k)
    agg = empty(meta, domains)
    N, L, E = doc_loads.shape
    tokens = doc_loads[:, 0].sum(axis=-1)
    offset = np.zeros(meta.groups, dtype=np.int64)  # tokens already in each group
    rows = []
    for n in range(N):
        g, d = n % meta.groups, int(doc_domain[n])
        agg.assigned[g, :, d] += doc_loads[n]
        agg.first[g, :, d] += doc_loads[n]
        agg.tokens[g, d] += tokens[n]
        agg.scored[g, d] += tokens[n] - 1
        agg.nll[g, d] += 2.0 * (tokens[n] - 1)
        for li in range(L):
            agg.pairs[g, li][np.diag_indices(E)] += doc_loads[n, li]
        # An expert the document uses is first seen at the document's start (if not seen before).
        unseen = (agg.first_seen[g] < 0) & (doc_loads[n] > 0)
        agg.first_seen[g][unseen] = offset[g]
        offset[g] += tokens[n]
        rows.append((n, f"doc{n}", domains[d], g, int(tokens[n]), 2.0 * (tokens[n] - 1), int(tokens[n] - 1)))
    agg.docs = pd.DataFrame(rows, columns=["ordinal", "name", "domain", "group", "tokens", "nll", "scored"])
    agg.doc_loads = doc_loads.astype(np.int64)
    agg.documents_done = N
    return agg


def routed_documents(
    rng: np.random.Generator, doc_probs: np.ndarray, lengths: np.ndarray
) -> np.ndarray:  # (N, L, E) loads
    """Top-1 loads of documents whose tokens each pick expert e with probability doc_probs[n, l, e]."""
    N, L, _ = doc_probs.shape
    return np.stack([np.stack([rng.multinomial(lengths[n], doc_probs[n, li]) for li in range(L)]) for n in range(N)])


def specialised_corpus(seed: int = 0, docs_per_domain: int = 12, focus: float = 0.8) -> CorpusAggregates:
    """D = E = 3 domains and experts; in layer 0 domain d's tokens go to expert d with probability
    ``focus`` (the rest evenly), in layer 1 every domain routes uniformly."""
    rng = np.random.default_rng(seed)
    D = E = 3
    N = D * docs_per_domain
    doc_domain = np.arange(N) % D
    probs = np.empty((N, 2, E))
    probs[:, 0] = (1 - focus) / (E - 1)
    probs[np.arange(N), 0, doc_domain] = focus
    probs[:, 1] = 1 / E
    lengths = rng.integers(40, 80, N)
    meta = make_meta(num_experts=E, top_k=(1, 1), layers=(3, 5), groups=N)
    return corpus_from_documents(meta, ["web", "code", "math"], doc_domain, routed_documents(rng, probs, lengths))


# ------------------------------------------------------------------------ 1. domain specialisation
def test_domain_share_is_counts_over_the_domain_total_and_ratio_is_share_times_experts():
    meta = make_meta(num_experts=4, groups=2)
    agg = empty(meta, ["web", "code"])
    agg.assigned[0, 0] = [[6, 2, 2, 0], [1, 1, 1, 5]]
    agg.assigned[1, 0] = [[4, 3, 2, 1], [0, 1, 1, 2]]  # totals: web [10, 5, 4, 1] / 20, code [1, 2, 2, 7] / 12
    agg.tokens[:] = agg.assigned.sum(axis=(1, 3))  # top-1: one assignment per token
    rs = stats.Resampler(agg, replicates=20, seed=0)
    ds = stats.domain_specialisation(agg, rs, null_permutations=10)

    want = np.array([[10, 5, 4, 1], [1, 2, 2, 7]]) / np.array([[20], [12]])
    np.testing.assert_allclose(ds.share.value[0], want)
    np.testing.assert_allclose(ds.ratio.value[0], want * 4)
    np.testing.assert_allclose(ds.ratio.low, ds.share.low * 4)
    np.testing.assert_allclose(ds.ratio.high, ds.share.high * 4)
    np.testing.assert_allclose(ds.token_rate.value[0], want)  # top-1: assignments per token = share
    np.testing.assert_allclose(ds.share.value.sum(axis=-1), 1.0)
    assert ds.fair_share == 0.25
    assert ds.domains == ["web", "code"] and ds.layers == (0,)
    assert np.all(ds.share.low <= ds.share.value + 1e-12) and np.all(ds.share.value <= ds.share.high + 1e-12)


def test_domain_token_rate_divides_by_tokens_so_top_k_rates_sum_to_k():
    meta = make_meta(num_experts=4, top_k=(2,), groups=1)
    agg = empty(meta, ["web"])
    agg.assigned[0, 0, 0] = [10, 6, 3, 1]  # 10 tokens x 2 experts
    agg.tokens[0, 0] = 10
    ds = stats.domain_specialisation(agg, stats.Resampler(agg, replicates=10), null_permutations=5)
    np.testing.assert_allclose(ds.share.value[0, 0], [0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(ds.token_rate.value[0, 0], [1.0, 0.6, 0.3, 0.1])
    assert ds.token_rate.value[0, 0].sum() == pytest.approx(2.0)


def test_mutual_information_is_zero_for_independent_counts():
    joint = np.outer([30, 10, 5], [1, 2, 3, 4]).astype(float)
    assert stats.mutual_information_bits(joint) == pytest.approx(0.0, abs=1e-12)
    # Batched over leading axes (an unused expert, a column of zeros, changes nothing).
    batch = np.stack([joint, np.outer([1, 1, 2], [5, 5, 0, 2]).astype(float)])
    np.testing.assert_allclose(stats.mutual_information_bits(batch), 0.0, atol=1e-12)


@pytest.mark.parametrize("D", [2, 3, 4, 8])
def test_mutual_information_is_log2_domains_for_a_perfectly_specialised_design(D):
    joint = np.eye(D) * 50  # domain d only ever routed to expert d, equal counts
    assert stats.mutual_information_bits(joint) == pytest.approx(math.log2(D), rel=1e-12)
    meta = make_meta(num_experts=D, groups=1)
    agg = empty(meta, [f"d{i}" for i in range(D)])
    agg.assigned[0, 0] = joint.astype(np.int64)
    agg.tokens[0] = 50
    ds = stats.domain_specialisation(agg, stats.Resampler(agg, replicates=10), null_permutations=5)
    assert ds.mi_bits.value[0] == pytest.approx(math.log2(D), rel=1e-12)


def test_report_mi_interval_excludes_zero_and_the_permutation_null_on_specialised_data(tmp_path):
    agg = specialised_corpus(seed=1)
    report = corpus_report(agg, replicates=100, seed=0)
    mi = report.domain.mi_bits
    assert mi.excludes(0.0, 0), mi.at(0)
    _, low, _ = mi.at(0)
    null = report.domain.mi_null_95
    assert low > 5 * null[0], (mi.at(0), null)
    # The specialised layer's shares: domain d's biggest share is expert d, near 0.8.
    share = report.domain.share.value[0]
    assert list(share.argmax(axis=1)) == [0, 1, 2]
    np.testing.assert_allclose(np.diagonal(share), 0.8, atol=0.05)
    # Layer 1 routes uniformly in every domain: its MI is at chance level, far below layer 0's.
    assert mi.value[1] < 3 * null[1] and mi.value[1] < mi.value[0] / 20
    # The whole report is JSON (no NaN) even with statistics that have no data (reuse, saturation).
    path = write_report(report, tmp_path / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded["domain"]["mi_bits"]["value"][0] == pytest.approx(mi.value[0], abs=1e-7)
    assert report.documents == 36 and report.tokens == agg.total_tokens


def test_permutation_null_is_well_below_observed_mi_for_specialised_documents():
    agg = specialised_corpus(seed=2)
    ds = stats.domain_specialisation(agg, stats.Resampler(agg, replicates=20), null_permutations=200, seed=3)
    assert ds.mi_null_95[0] > 0
    # 36 documents: chance alone gives about (D-1)(E-1)/(2 N ln 2) = 0.08 bits; layer 0 holds ~0.63.
    assert ds.mi_bits.value[0] > 5 * ds.mi_null_95[0], (ds.mi_bits.value, ds.mi_null_95)
    assert ds.mi_bits.value[1] < 2 * ds.mi_null_95[1]  # the uniform layer is at chance level
    assert ds.null_permutations == 200


def test_permutation_null_is_comparable_to_observed_mi_when_domain_labels_are_random():
    rng = np.random.default_rng(4)
    N, E = 60, 4
    probs = rng.dirichlet(np.full(E, 2.0), size=(N, 1))  # each document its own routing, no domain effect
    loads = routed_documents(rng, probs, rng.integers(30, 90, N))
    doc_domain = rng.integers(0, 3, N)  # labels carry no information
    agg = corpus_from_documents(make_meta(num_experts=E, groups=N), ["a", "b", "c"], doc_domain, loads)
    ds = stats.domain_specialisation(agg, stats.Resampler(agg, replicates=20), null_permutations=300, seed=5)
    observed, null95 = ds.mi_bits.value[0], ds.mi_null_95[0]
    assert null95 > 0
    assert 0.1 * null95 < observed < 1.5 * null95, (observed, null95)


def test_permutation_null_is_seeded_and_zero_without_per_document_rows():
    agg = specialised_corpus(seed=6, docs_per_domain=6)
    rs = stats.Resampler(agg, replicates=10)
    a = stats.domain_specialisation(agg, rs, null_permutations=50, seed=7).mi_null_95
    b = stats.domain_specialisation(agg, rs, null_permutations=50, seed=7).mi_null_95
    np.testing.assert_array_equal(a, b)
    agg.docs = agg.docs.iloc[:0]
    agg.doc_loads = agg.doc_loads[:0]
    np.testing.assert_array_equal(stats.domain_specialisation(agg, rs, null_permutations=50).mi_null_95, [0.0, 0.0])


# ------------------------------------------------------------------------ 2. vocabulary specialisation
def vocab_corpus() -> CorpusAggregates:
    """Two MoE layers (decoder layers 2 and 4), E = 4, top-1, three groups.

    layer 0: token 7 x20 (15 -> expert 3, spread over groups; 5 -> expert 1): spec 0.75
             token 9 x12 (6 -> expert 0, 6 -> expert 2): spec 0.5
             token 11 x5 (all -> expert 2): spec 1, but below min_count 10
    layer 1: token 7 x20 (all -> expert 0): spec 1
             token 9 x12 (4 each -> experts 1, 2, 3): spec 1/3
    """
    meta = make_meta(num_experts=4, top_k=(1, 1), layers=(2, 4), groups=3, vocab_size=50)
    agg = empty(meta, ["web"])
    rows = [
        # group, layer, token, expert, count
        (0, 0, 7, 3, 10),
        (1, 0, 7, 3, 5),
        (2, 0, 7, 1, 5),
        (0, 0, 9, 0, 6),
        (1, 0, 9, 2, 6),
        (2, 0, 11, 2, 5),
        (0, 1, 7, 0, 12),
        (1, 1, 7, 0, 8),
        (0, 1, 9, 1, 4),
        (1, 1, 9, 2, 4),
        (2, 1, 9, 3, 4),
    ]
    agg.vocab["input"] = pd.DataFrame(rows, columns=["group", "layer", "token", "expert", "count"]).astype("int64")
    # First choices per layer (what the baseline reads): layer 0 [6, 5, 11, 15], layer 1 [20, 4, 4, 4].
    agg.first[0, 0, 0] = [6, 0, 0, 10]
    agg.first[1, 0, 0] = [0, 0, 6, 5]
    agg.first[2, 0, 0] = [0, 5, 5, 0]
    agg.first[0, 1, 0] = [12, 4, 0, 0]
    agg.first[1, 1, 0] = [8, 0, 4, 0]
    agg.first[2, 1, 0] = [0, 0, 0, 4]
    agg.assigned[:] = agg.first
    agg.tokens[:, 0] = [16, 11, 10]
    return agg


def test_vocabulary_specialisation_is_the_top_expert_share_of_a_token():
    agg = vocab_corpus()
    vs = stats.vocabulary_specialisation(agg, stats.Resampler(agg, replicates=20), "input", min_count=10)
    row = vs.table[(vs.table["layer"] == 2) & (vs.table["token"] == 7)].iloc[0]
    assert row["occurrences"] == 20 and row["expert"] == 3 and row["spec"] == pytest.approx(0.75)
    row = vs.table[(vs.table["layer"] == 4) & (vs.table["token"] == 9)].iloc[0]
    assert row["occurrences"] == 12 and row["spec"] == pytest.approx(1 / 3)
    assert vs.kind == "input" and vs.layers == (2, 4) and vs.min_count == 10


def test_vocabulary_mean_excludes_tokens_below_min_count_and_equals_the_hand_average():
    agg = vocab_corpus()
    rs = stats.Resampler(agg, replicates=20)
    vs = stats.vocabulary_specialisation(agg, rs, "input", min_count=10)
    np.testing.assert_allclose(vs.mean.value, [(0.75 + 0.5) / 2, (1 + 1 / 3) / 2])
    np.testing.assert_array_equal(vs.tokens_counted, [2, 2])
    assert 11 not in set(vs.table["token"])  # 5 occurrences < 10
    # The baseline is a token-blind router at the same counts: above the busiest expert's share.
    assert (vs.baseline > [15 / 37, 20 / 32]).all() and (vs.baseline < 1).all()
    # Lowering min_count lets token 11 (spec 1) into layer 0's mean.
    vs5 = stats.vocabulary_specialisation(agg, rs, "input", min_count=5)
    np.testing.assert_allclose(vs5.mean.value, [(0.75 + 0.5 + 1) / 3, (1 + 1 / 3) / 2])
    np.testing.assert_array_equal(vs5.tokens_counted, [3, 2])
    # A kind with no rows has no tokens counted and a NaN mean.
    empty_kind = stats.vocabulary_specialisation(agg, rs, "target", min_count=10)
    assert np.isnan(empty_kind.mean.value).all() and not empty_kind.tokens_counted.any()


# ------------------------------------------------------------------------ 3. co-activation
def pairs_of(sets: list[tuple[tuple[int, ...], int]], E: int) -> np.ndarray:
    """(E, E) pair counts of tokens given as (expert set, how many tokens)."""
    out = np.zeros((E, E), dtype=np.int64)
    for experts, n in sets:
        m = np.zeros(E, dtype=np.int64)
        m[list(experts)] = 1
        out += n * np.outer(m, m)
    return out


def test_coactivation_is_pair_count_over_tokens_of_a_with_nan_diagonal_and_independence_baselines():
    E = 4
    meta = make_meta(num_experts=E, top_k=(2, 3), layers=(0, 1), groups=2)
    agg = empty(meta, ["web"])
    # Layer 0 (k=2): expert 0 is in 40 tokens, 20 of them with expert 1 -> A[0, 1] = 0.5; expert 1
    # is in 20 + 30 + 30 = 80 tokens -> A[1, 0] = 20/80 = 0.25. Split over two groups.
    agg.pairs[0, 0] = pairs_of([((0, 1), 10), ((0, 2), 20), ((1, 2), 30)], E)
    agg.pairs[1, 0] = pairs_of([((0, 1), 10), ((1, 3), 30), ((2, 3), 10)], E)
    agg.pairs[0, 1] = pairs_of([((0, 1, 2), 10)], E)
    agg.pairs[1, 1] = pairs_of([((1, 2, 3), 10)], E)
    # Adjacent ranks (layer 0, k=2: the pair itself, both ways; layer 1: a chosen rank order).
    agg.adjacent[:, 0] = agg.pairs[:, 0] - agg.pairs[:, 0] * np.eye(E, dtype=np.int64)
    agg.adjacent[0, 1] = pairs_of([((0, 1), 10), ((1, 2), 10)], E) - np.diag([10, 20, 10, 0])  # order 0,1,2
    agg.tokens[:, 0] = [60, 50]
    rs = stats.Resampler(agg, replicates=30)
    co = stats.coactivation(agg, rs)
    A = co.matrix.value
    assert A[0, 0, 1] == pytest.approx(0.5)
    assert A[0, 1, 0] == pytest.approx(0.25)
    assert A[0, 0, 2] == pytest.approx(0.5) and A[0, 0, 3] == 0.0
    assert A[0, 3, 2] == pytest.approx(10 / 40)
    assert np.isnan(np.diagonal(A, axis1=-2, axis2=-1)).all()
    assert np.isnan(np.diagonal(co.matrix.low, axis1=-2, axis2=-1)).all()
    np.testing.assert_array_equal(co.tokens, [[40, 80, 60, 40], [10, 20, 20, 10]])
    np.testing.assert_allclose(A[1, 1], [0.5, np.nan, 1.0, 0.5])  # expert 1 always with 2; with 0 or 3 half the time
    # Row sums of A are k - 1 (each token of a has k - 1 partners).
    np.testing.assert_allclose(np.nansum(A, axis=-1), [[1, 1, 1, 1], [2, 2, 2, 2]])
    np.testing.assert_allclose(co.baseline, [(2 - 1) / (E - 1), (3 - 1) / (E - 1)])  # 1/3, 2/3
    assert co.strongest(0, min_tokens=30) == (3, 1, *co.matrix.at(0, 3, 1))  # A[3, 1] = 30/40 is the largest
    # With at least 50 tokens only experts 1 (80) and 2 (60) qualify: A[2, 1] = 30/60 is their largest.
    assert co.strongest(0, min_tokens=50) == (2, 1, *co.matrix.at(0, 2, 1))
    assert co.strongest(0, min_tokens=50)[2] == pytest.approx(0.5)
    assert co.strongest(0, min_tokens=1000) is None

    adj = stats.coactivation(agg, rs, adjacent=True)
    assert adj.adjacent and not co.adjacent
    np.testing.assert_allclose(adj.matrix.value[0], A[0], equal_nan=True)  # k=2: adjacency = co-occurrence
    assert adj.matrix.value[1, 0, 1] == pytest.approx(10 / 10)  # ranks 0-1 adjacent in the 10 {0,1,2} tokens
    assert adj.matrix.value[1, 0, 2] == 0.0  # 0 and 2 are two ranks apart
    np.testing.assert_allclose(adj.baseline, [2 * 1 / (2 * 3), 2 * 2 / (3 * 3)])  # 2(k-1)/(k(E-1))


# ------------------------------------------------------------------------ 4. reuse
def test_reuse_rates_are_count_ratios_and_baselines_are_the_uniform_routing_ones():
    meta = make_meta(num_experts=8, top_k=(2, 8), layers=(0, 1), groups=2)
    agg = empty(meta, ["web"])
    agg.reuse[0, 0, 0] = [100, 30, 60, 80]  # pairs, same first choice, sets intersect, summed overlap
    agg.reuse[1, 0, 0] = [100, 10, 40, 40]
    agg.reuse[:, 1, 0] = [[50, 5, 50, 400], [50, 5, 50, 400]]
    agg.tokens[:, 0] = [102, 102]
    r = stats.reuse(agg, stats.Resampler(agg, replicates=20))
    np.testing.assert_array_equal(r.pairs, [200, 100])
    np.testing.assert_allclose(r.first_choice_same.value, [40 / 200, 0.1])
    np.testing.assert_allclose(r.sets_intersect.value, [100 / 200, 1.0])
    np.testing.assert_allclose(r.mean_overlap.value, [120 / 200, 8.0])
    np.testing.assert_allclose(r.baselines[0], reuse_baselines(8, 2))
    np.testing.assert_allclose(r.baselines[0], [0.125, 0.4643, 0.5], atol=1e-4)
    np.testing.assert_allclose(r.baselines[1], [1 / 8, 1.0, 8.0])  # k = E: every pair of sets is the same
    # Intervals bracket the estimate; group 0 alone gives 0.3, group 1 alone 0.1: the interval lies in there.
    lo, hi = r.first_choice_same.low[0], r.first_choice_same.high[0]
    assert 0.1 - 1e-12 <= lo <= 0.2 <= hi <= 0.3 + 1e-12


# ------------------------------------------------------------------------ 5. coverage
def test_coverage_curve_of_loads_4_3_2_1_and_experts_needed_for_a_share():
    meta = make_meta(num_experts=4, groups=1)
    agg = empty(meta, ["web", "code"])
    agg.assigned[0, 0] = [[2, 1, 1, 2], [0, 3, 0, 1]]  # expert loads [2, 4, 1, 3]: ranked 4, 3, 2, 1
    agg.tokens[0] = [6, 4]
    cov = stats.coverage(agg, stats.Resampler(agg, replicates=10))
    np.testing.assert_allclose(cov.curve.value[0], [0.4, 0.7, 0.9, 1.0])
    assert cov.experts_for(0, 0.7) == 2
    assert cov.experts_for(0, 0.4) == 1
    assert cov.experts_for(0, 0.71) == 3
    assert cov.experts_for(0, 1.0) == 4
    assert cov.layers == (0,)


# ------------------------------------------------------------------------ 6. dormant experts
def test_dormant_curve_is_non_increasing_and_reaches_the_never_used_count():
    E = 5
    meta = make_meta(num_experts=E, top_k=(1, 1), layers=(0, 1), groups=4)
    agg = empty(meta, ["web"])
    agg.tokens[:3, 0] = [10, 20, 30]  # group 3 holds no tokens (left out)
    # Layer 0: expert 0 starts every group; 1 and 2 come later; 3 only near the end of group 2; 4 never.
    agg.first_seen[0, 0] = [0, 3, -1, -1, -1]
    agg.first_seen[1, 0] = [0, -1, 5, -1, -1]
    agg.first_seen[2, 0] = [0, 1, 2, 29, -1]
    # Layer 1: experts 3 and 4 never.
    agg.first_seen[:3, 1] = [[0, 1, 2, -1, -1], [0, 1, -1, -1, -1], [0, 1, 2, -1, -1]]
    dm = stats.dormant(agg, orders=100, seed=0)
    np.testing.assert_array_equal(dm.final, [1, 2])
    assert dm.tokens[0] == 1 and dm.tokens[-1] == 60
    for curve in (dm.median, dm.low, dm.high):
        assert np.all(np.diff(curve, axis=-1) <= 0)
        np.testing.assert_array_equal(curve[:, -1], dm.final)
    np.testing.assert_array_equal(dm.median[:, 0], [E - 1, E - 1])  # after one token only expert 0 is seen
    assert np.all(dm.low <= dm.median) and np.all(dm.median <= dm.high)
    assert dm.orders == 100


def test_dormant_counts_experts_never_used_in_any_group():
    meta = make_meta(num_experts=3, groups=2)
    agg = empty(meta, ["web"])
    agg.tokens[:, 0] = [4, 4]
    agg.first_seen[0, 0] = [0, -1, -1]
    agg.first_seen[1, 0] = [-1, 2, -1]
    dm = stats.dormant(agg, orders=20)
    np.testing.assert_array_equal(dm.final, [1])


# ------------------------------------------------------------------------ 7. importance
def test_importance_rank_correlation_is_one_when_loss_change_is_ordered_like_load_share():
    meta = make_meta(num_experts=4, top_k=(1, 1), layers=(0, 1), groups=3)
    agg = empty(meta, ["web"])
    agg.assigned[:, 0, 0] = [[20, 15, 10, 5], [20, 15, 10, 5], [0, 0, 0, 0]]
    agg.assigned[:, 1, 0] = [[5, 10, 15, 20], [5, 10, 15, 20], [0, 0, 0, 0]]
    agg.tokens[:, 0] = [50, 50, 1]
    # |Δ loss| in layer 0 ordered like the load (signs may differ); in layer 1 the reverse.
    agg.importance[:2, 0] = [[-4.0, 3.0, -2.0, 1.0], [-4.0, 3.0, -2.0, 1.0]]
    agg.importance[:2, 1] = [[-4.0, 3.0, -2.0, 1.0], [-4.0, 3.0, -2.0, 1.0]]
    agg.importance_scored[:] = [40, 40, 0]
    imp = stats.importance(agg, stats.Resampler(agg, replicates=30))
    assert imp is not None
    np.testing.assert_allclose(imp.delta_loss.value[0], [-0.1, 0.075, -0.05, 0.025])
    np.testing.assert_allclose(imp.load_share[0], [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(imp.rank_correlation.value, [1.0, -1.0])
    np.testing.assert_allclose(imp.rank_correlation.low, [1.0, -1.0])  # every resample keeps the order
    np.testing.assert_allclose(stats.spearman(np.array([1.0, 2, 3]), np.array([10.0, 30, 20])), 0.5)
    agg.importance_scored[:] = 0
    assert stats.importance(agg, stats.Resampler(agg, replicates=10)) is None


# ------------------------------------------------------------------------ saturation, balance, loss
def test_saturation_balance_and_loss_are_their_count_ratios():
    meta = replace(make_meta(num_experts=4, top_k=(2,), groups=2), reference_model="ref/ckpt")
    agg = empty(meta, ["web", "code"])
    agg.saturation[:, 0] = [[30, 8, 20], [10, 4, 10]]  # summed |S ∩ S_ref|, same first choice, tokens
    agg.assigned[0, 0] = [[4, 3, 0, 1], [0, 0, 2, 0]]  # expert loads [4, 3, 2, 1]
    agg.dropped[0, 0, 0] = [1, 0, 0, 0]
    agg.tokens[0] = [4, 1]
    agg.tokens[1] = [10, 0]  # group 1 must hold tokens to count (its other counts are left at zero)
    agg.nll[0] = [6.0, 1.0]
    agg.scored[0] = [3, 1]
    rs = stats.Resampler(agg, replicates=10)
    sat = stats.saturation(agg, rs, native_k=(2,))
    assert sat is not None and sat.reference_model == "ref/ckpt"
    np.testing.assert_allclose(sat.topk_overlap.value, [40 / (30 * 2)])
    np.testing.assert_allclose(sat.first_choice_match.value, [12 / 30])
    assert stats.saturation(replace(agg, meta=replace(meta, reference_model=None)), rs, (2,)) is None
    bal = stats.balance(agg, rs)
    kept = np.array([3, 3, 2, 1])
    np.testing.assert_allclose(bal.cv.value, [kept.std() / kept.mean()])
    np.testing.assert_allclose(bal.max_vio.value, [3 / 2.25 - 1])
    np.testing.assert_allclose(bal.drop_rate.value, [1 / 10])
    loss = stats.domain_loss(agg, rs)
    np.testing.assert_allclose(loss.loss.value, [2.0, 1.0])
    assert float(loss.overall.value) == pytest.approx(7 / 4)


# ------------------------------------------------------------------------ 8. merge, save, load
def random_part(rng: np.random.Generator, domains: list[str], first_ordinal: int) -> CorpusAggregates:
    meta = make_meta(num_experts=4, top_k=(2, 2), layers=(1, 3), groups=3, window=8)
    agg = empty(meta, domains)
    for name in ("assigned", "dropped", "first", "pairs", "adjacent", "reuse", "positions", "saturation"):
        arr = getattr(agg, name)
        arr[...] = rng.integers(0, 9, arr.shape)
    agg.tokens[...] = rng.integers(1, 20, agg.tokens.shape)
    agg.scored[...] = agg.tokens - 1
    agg.nll[...] = rng.random(agg.nll.shape) * 10
    agg.first_seen[...] = rng.integers(-1, 6, agg.first_seen.shape)
    agg.importance[...] = rng.normal(size=agg.importance.shape)
    agg.importance_scored[...] = rng.integers(0, 5, agg.importance_scored.shape)
    agg.vocab["input"] = pd.DataFrame(
        {"group": [0, 1], "layer": [0, 1], "token": [5, 6], "expert": [2, 3], "count": rng.integers(1, 9, 2)}
    ).astype("int64")
    n = 2
    agg.docs = pd.DataFrame(
        {
            "ordinal": np.arange(first_ordinal, first_ordinal + n, dtype=np.int64),
            "name": [f"doc{i}" for i in range(first_ordinal, first_ordinal + n)],
            "domain": [domains[i % len(domains)] for i in range(n)],
            "group": np.arange(first_ordinal, first_ordinal + n, dtype=np.int64) % 3,
            "tokens": rng.integers(1, 20, n),
            "nll": rng.random(n),
            "scored": rng.integers(0, 19, n),
        }
    )
    agg.doc_loads = rng.integers(0, 9, (n, 2, 4))
    agg.chunks_done = 3
    agg.documents_done = first_ordinal + n
    return agg


def test_merge_sums_counts_aligns_domains_by_name_and_offsets_first_seen():
    rng = np.random.default_rng(8)
    a = random_part(rng, ["web", "code"], 0)
    b = random_part(rng, ["code", "math"], 2)
    a.first_seen[0, 0] = [-1, 2, -1, 0]
    b.first_seen[0, 0] = [4, 1, -1, 3]
    m = aggregates.merge(a, b)
    assert m.domains == ["web", "code", "math"]
    domain_axes = (
        ("assigned", 2),
        ("dropped", 2),
        ("first", 2),
        ("reuse", 2),
        ("tokens", 1),
        ("nll", 1),
        ("scored", 1),
    )
    for name, axis in domain_axes:
        got, x, y = getattr(m, name), getattr(a, name), getattr(b, name)
        web, code, math_ = (np.take(got, i, axis=axis) for i in range(3))
        np.testing.assert_allclose(web, np.take(x, 0, axis=axis))
        np.testing.assert_allclose(code, np.take(x, 1, axis=axis) + np.take(y, 0, axis=axis))
        np.testing.assert_allclose(math_, np.take(y, 1, axis=axis))
    for name in ("pairs", "adjacent", "positions", "saturation", "importance", "importance_scored"):
        np.testing.assert_allclose(getattr(m, name), getattr(a, name) + getattr(b, name), err_msg=name)
    a_tokens0 = int(a.tokens[0].sum())
    np.testing.assert_array_equal(m.first_seen[0, 0], [4 + a_tokens0, 2, -1, 0])
    never_in_a = a.first_seen < 0
    want = np.where(
        never_in_a, np.where(b.first_seen >= 0, b.first_seen + a.tokens.sum(1)[:, None, None], -1), a.first_seen
    )
    np.testing.assert_array_equal(m.first_seen, want)
    assert list(m.docs["ordinal"]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(m.doc_loads, np.concatenate([a.doc_loads, b.doc_loads]))
    assert m.vocab["input"]["count"].sum() == a.vocab["input"]["count"].sum() + b.vocab["input"]["count"].sum()
    assert m.chunks_done == 6 and m.documents_done == 4
    # The empty aggregates are the identity of merge.
    assert aggregates.equal(aggregates.merge(empty(a.meta, []), a), a)


def test_merge_refuses_aggregates_of_different_runs():
    rng = np.random.default_rng(9)
    a = random_part(rng, ["web"], 0)
    b = random_part(rng, ["web"], 2)
    b.meta = replace(b.meta, num_experts=8)
    with pytest.raises(ValueError, match="num_experts"):
        aggregates.merge(a, b)


def test_save_and_load_round_trip_is_equal(tmp_path):
    rng = np.random.default_rng(10)
    m = aggregates.merge(random_part(rng, ["web", "code"], 0), random_part(rng, ["code", "math"], 2))
    folder = aggregates.save(m, tmp_path / "run")
    loaded = aggregates.load(folder)
    assert aggregates.equal(loaded, m)
    assert aggregates.equal(m, loaded)
    assert loaded.meta == m.meta and loaded.domains == m.domains
    assert loaded.chunks_done == m.chunks_done and loaded.documents_done == m.documents_done
    # Saving again over the same folder replaces it.
    m.tokens[0, 0] += 1
    aggregates.save(m, folder)
    assert aggregates.equal(aggregates.load(folder), m)
    assert not aggregates.equal(loaded, m)


def test_loading_a_folder_without_meta_json_raises_naming_the_folder(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "stray.txt").write_text("hello")
    with pytest.raises(ValueError, match="not_a_run"):
        aggregates.load(folder)
    with pytest.raises(ValueError, match="missing_run"):
        aggregates.load(tmp_path / "missing_run")


# ------------------------------------------------------------------------ 9. bootstrap coverage
def simulated_corpus(
    rng: np.random.Generator, n_docs: int, p_true: tuple[float, ...], stay_true: float, concentration: float
) -> CorpusAggregates:
    """One corpus of ``n_docs`` top-1 documents (one group each), domains alternating. Document n of
    domain d sends each token to expert 0 with its own probability p_n ~ Beta with mean p_true[d]
    (between-document variance), the rest evenly to experts 1..3; each consecutive token pair keeps
    its first choice with the document's own probability s_n ~ Beta with mean ``stay_true``. With
    lengths independent of p_n and s_n, the corpus-level ratios estimate exactly p_true and stay_true."""
    D, E = len(p_true), 4
    meta = make_meta(num_experts=E, groups=n_docs)
    agg = empty(meta, [f"d{d}" for d in range(D)])
    dom = np.arange(n_docs) % D
    lengths = rng.integers(20, 100, n_docs)
    mean = np.asarray(p_true)[dom]
    p = rng.beta(mean * concentration, (1 - mean) * concentration)
    to_zero = rng.binomial(lengths, p)
    rest = rng.multinomial(lengths - to_zero, np.full(E - 1, 1 / (E - 1)))  # (N, E-1)
    g = np.arange(n_docs)
    agg.assigned[g, 0, dom] = np.column_stack([to_zero, rest])
    agg.tokens[g, dom] = lengths
    s = rng.beta(stay_true * concentration, (1 - stay_true) * concentration, n_docs)
    same = rng.binomial(lengths - 1, s)
    agg.reuse[g, 0, dom] = np.column_stack([lengths - 1, same, same, same])  # top-1: intersect = overlap = same
    return agg


def test_bootstrap_intervals_cover_the_true_share_and_reuse_rate_about_95_percent_of_the_time():
    t0 = time.perf_counter()
    p_true, stay_true = (0.3, 0.6), 0.4
    corpora, n_docs, concentration = 200, 60, 8.0
    hits_share = np.zeros(len(p_true))
    hits_reuse = 0
    naive_hits = 0  # a token-level (binomial) interval that ignores documents: should under-cover
    widths = []
    for r in range(corpora):
        rng = np.random.default_rng(1000 + r)
        agg = simulated_corpus(rng, n_docs, p_true, stay_true, concentration)
        rs = stats.Resampler(agg, replicates=200, seed=r)
        share = stats.domain_specialisation(agg, rs, null_permutations=1).share
        for d, p in enumerate(p_true):
            _, lo, hi = share.at(0, d, 0)
            hits_share[d] += lo <= p <= hi
            widths.append(hi - lo)
        fc = stats.reuse(agg, rs).first_choice_same
        _, lo, hi = fc.at(0)
        hits_reuse += lo <= stay_true <= hi
        value, n = share.value[0, 0, 0], agg.tokens[:, 0].sum()
        half = 1.96 * math.sqrt(value * (1 - value) / n)
        naive_hits += value - half <= p_true[0] <= value + half
    cov_share = hits_share / corpora
    cov_reuse = hits_reuse / corpora
    cov_naive = naive_hits / corpora
    elapsed = time.perf_counter() - t0
    print(
        f"\nbootstrap 95% coverage over {corpora} corpora of {n_docs} documents: "
        f"share d0 (p={p_true[0]}) {cov_share[0]:.3f}, share d1 (p={p_true[1]}) {cov_share[1]:.3f}, "
        f"reuse (s={stay_true}) {cov_reuse:.3f}; naive token-level interval {cov_naive:.3f}; "
        f"mean width {np.mean(widths):.3f}; {elapsed:.1f} s"
    )
    for c in (*cov_share, cov_reuse):
        assert 0.85 <= c <= 0.99, (cov_share, cov_reuse)
    # The check has teeth: ignoring the documents (resampling tokens) would cover far less often.
    assert cov_naive < 0.8, cov_naive


# ------------------------------------------------------------------------ 10. input checks
@pytest.mark.parametrize("replicates", [0, 5, 9, 10.0, True, "200"])
def test_resampler_refuses_fewer_than_ten_or_non_integer_replicates(replicates):
    agg = specialised_corpus(docs_per_domain=2)
    with pytest.raises(ValueError, match="replicates"):
        stats.Resampler(agg, replicates=replicates)


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, float("nan")])
def test_resampler_refuses_a_level_outside_zero_one(level):
    agg = specialised_corpus(docs_per_domain=2)
    with pytest.raises(ValueError, match="level"):
        stats.Resampler(agg, level=level)


def test_resampler_refuses_a_run_without_tokens_and_is_seeded():
    with pytest.raises(ValueError, match="no tokens"):
        stats.Resampler(empty(make_meta(), ["web"]))
    agg = specialised_corpus(docs_per_domain=2)
    np.testing.assert_array_equal(stats.Resampler(agg, seed=3).weights, stats.Resampler(agg, seed=3).weights)
    assert not np.array_equal(stats.Resampler(agg, seed=3).weights, stats.Resampler(agg, seed=4).weights)
    assert stats.Resampler(agg, replicates=10, level=0.9).weights.shape == (10, 6)


def test_vocabulary_specialisation_refuses_an_unknown_kind_and_a_bad_min_count():
    agg = vocab_corpus()
    rs = stats.Resampler(agg, replicates=10)
    with pytest.raises(ValueError, match="kind"):
        stats.vocabulary_specialisation(agg, rs, kind="output")
    with pytest.raises(ValueError, match="min_count"):
        stats.vocabulary_specialisation(agg, rs, kind="input", min_count=0)


def test_token_blind_baseline_is_the_expected_top_share_at_small_counts_not_the_busiest_share():
    # 8 equally used experts, tokens seen 10 times: the top expert of 10 random draws takes ~30 %,
    # far above 1/8; with many occurrences it tends to 1/8.
    uniform = np.ones(8)
    assert stats.token_blind_spec(np.full(50, 10), uniform, seed=0) == pytest.approx(0.30, abs=0.02)
    assert stats.token_blind_spec(np.full(5, 5000), uniform, seed=0) == pytest.approx(0.125, abs=0.01)
    assert math.isnan(stats.token_blind_spec(np.array([]), uniform, seed=0))


@pytest.mark.parametrize(("experts", "kind"), [(8, "bar"), (64, "heatmap")])
def test_domain_chart_is_grouped_bars_for_few_experts_and_a_heatmap_for_many(experts, kind):
    from moe_viz.views.corpus import domain_shares

    rng = np.random.default_rng(0)
    agg = empty(make_meta(num_experts=experts, top_k=(2,), groups=6), ["a", "b"])
    agg.assigned[:, 0] = rng.integers(1, 20, agg.assigned[:, 0].shape)
    agg.tokens[:] = agg.assigned[:, 0].sum(axis=2) // 2
    view = domain_shares(report.corpus_report(agg, replicates=20), 0)
    assert view.figure.data[0].type == kind
    assert view.explanation.startswith("Each cell" if kind == "heatmap" else "Each bar")
    assert "balanced 1/" in (view.figure.layout.title.text + "".join(str(t.name) for t in view.figure.data))


def test_domain_heatmap_of_hundreds_of_experts_shows_the_most_domain_dependent_ones():
    from moe_viz.views.corpus import domain_shares

    rng = np.random.default_rng(0)
    agg = empty(make_meta(num_experts=256, top_k=(8,), groups=6), ["a", "b"])
    agg.assigned[:, 0] = rng.integers(1, 5, agg.assigned[:, 0].shape)
    agg.assigned[:, 0, 0, 200] += 400  # expert 200 is domain a's
    agg.tokens[:] = agg.assigned[:, 0].sum(axis=2) // 8
    heat = domain_shares(report.corpus_report(agg, replicates=20), 0).figure.data[0]
    assert len(heat.x) == 24 and heat.x[0] == "e200"  # furthest from the balanced share first
    assert array_values(heat.z).shape == (2, 24)
