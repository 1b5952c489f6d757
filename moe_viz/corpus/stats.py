"""Corpus statistics with bootstrap confidence intervals.

Every statistic is a function of summed counts. Its interval comes from resampling the run's
groups of whole documents with replacement (``replicates`` times, seeded) and recomputing the
statistic on each resample: a percentile interval at ``level``. With no more documents than groups
this is resampling documents. Definitions follow ``docs/routing-metrics`` of the design notes and
the papers named on each function; where conventions compete, the one used is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..metrics import reuse_baselines
from .aggregates import VOCAB_GROUPS, CorpusAggregates

DEFAULT_REPLICATES = 200
DEFAULT_LEVEL = 0.95
VOCAB_MIN_COUNT = 10


@dataclass(frozen=True)
class Estimate:
    """A statistic (any shape) with its bootstrap percentile interval, elementwise."""

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float = DEFAULT_LEVEL

    def at(self, *index: int) -> tuple[float, float, float]:
        return float(self.value[index]), float(self.low[index]), float(self.high[index])

    def excludes(self, x: float, *index: int) -> bool:
        """True when the interval at ``index`` lies entirely above or below ``x``."""
        _, lo, hi = self.at(*index)
        return lo > x or hi < x

    def to_dict(self) -> dict[str, Any]:
        return {"value": _jsonable(self.value), "low": _jsonable(self.low), "high": _jsonable(self.high)}


def _jsonable(a: np.ndarray) -> Any:
    """Nested lists of floats rounded to 8 digits, NaN and infinities as None."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 0:
        return round(float(a), 8) if math.isfinite(float(a)) else None
    return [_jsonable(x) for x in a]


class Resampler:
    """Seeded bootstrap over the groups of a run that hold tokens."""

    def __init__(
        self, agg: CorpusAggregates, replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL
    ):
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 10:
            raise ValueError(f"replicates must be an integer >= 10; got {replicates!r}")
        if not 0 < level < 1:
            raise ValueError(f"level must satisfy 0 < level < 1; got {level!r}")
        self.level = level
        self.seed = seed
        self.groups = np.flatnonzero(agg.tokens.sum(axis=1) > 0)  # groups that hold documents
        n = len(self.groups)
        if n == 0:
            raise ValueError("the run holds no tokens: nothing to compute statistics on")
        rng = np.random.default_rng(seed)
        self.weights = rng.multinomial(n, np.full(n, 1 / n), size=replicates).astype(np.float64)  # (B, n)

    def sums(self, per_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(total over groups, (B, ...) totals of each resample) of a (G, ...) array."""
        x = per_group[self.groups].astype(np.float64)
        return x.sum(axis=0), np.tensordot(self.weights, x, axes=(1, 0))

    def estimate(self, value: np.ndarray, reps: np.ndarray) -> Estimate:
        alpha = (1 - self.level) / 2
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                low = np.nanquantile(reps, alpha, axis=0)
                high = np.nanquantile(reps, 1 - alpha, axis=0)
        return Estimate(np.asarray(value, dtype=float), np.asarray(low), np.asarray(high), self.level)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


# ------------------------------------------------------------------ domain specialisation
def mutual_information_bits(joint: np.ndarray) -> np.ndarray:
    """I(D; E) in bits of joint counts (..., D, E): 0 when expert use does not depend on domain."""
    total = joint.sum(axis=(-2, -1), keepdims=True)
    p = _div(joint, total)
    pd_ = p.sum(axis=-1, keepdims=True)
    pe = p.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pd_ * pe)), 0.0)
    return terms.sum(axis=(-2, -1))


@dataclass(frozen=True)
class DomainSpecialisation:
    """Per layer x domain x expert: ``share`` = the domain's assignments that went to the expert
    (c_de / Σ_e c_de, which is c_de / k T_d when every token gets k experts; balanced share 1/E,
    Mixtral Fig. 7 and DeepSeek's relative load), ``ratio`` = share x E (1 = balanced), ``lift`` =
    share / the expert's share over all domains (1 when the domain does not matter, balanced or
    not), ``token_rate`` = the domain's tokens with the expert in their set (OLMoE's
    N_(E,D) / N_D; fair k/E). Per layer ``mi_bits`` = I(domain; expert) over assignments, and
    ``mi_null_95``: the 95th percentile of I when the documents' domains are shuffled (what chance
    gives on this corpus), from ``null_permutations`` seeded shuffles."""

    domains: list[str]
    layers: tuple[int, ...]
    share: Estimate  # (L, D, E)
    ratio: Estimate  # (L, D, E)
    lift: Estimate  # (L, D, E) share / the expert's share over all domains (1 = the domain changes nothing)
    token_rate: Estimate  # (L, D, E)
    mi_bits: Estimate  # (L,)
    mi_null_95: np.ndarray  # (L,)
    fair_share: float
    null_permutations: int


def domain_specialisation(
    agg: CorpusAggregates, rs: Resampler, null_permutations: int = 200, seed: int = 0
) -> DomainSpecialisation:
    E = agg.num_experts
    k = np.array(agg.meta.top_k, dtype=float)[:, None, None]  # (L, 1, 1)
    counts, counts_b = rs.sums(agg.assigned)  # (L, D, E), (B, L, D, E)
    tokens, tokens_b = rs.sums(agg.tokens)  # (D,), (B, D)
    per_domain = counts.sum(axis=-1, keepdims=True)
    share = rs.estimate(_div(counts, per_domain), _div(counts_b, counts_b.sum(axis=-1, keepdims=True)))
    ratio = Estimate(share.value * E, share.low * E, share.high * E, share.level)
    rate = rs.estimate(_div(counts, tokens[None, :, None]), _div(counts_b, tokens_b[:, None, :, None]))

    def lift_of(c: np.ndarray) -> np.ndarray:  # (..., L, D, E) counts -> share / overall share
        overall = _div(c.sum(axis=-2, keepdims=True), c.sum(axis=(-2, -1), keepdims=True))
        return _div(_div(c, c.sum(axis=-1, keepdims=True)), overall)

    lift = rs.estimate(lift_of(counts), lift_of(counts_b))
    mi = rs.estimate(mutual_information_bits(counts), mutual_information_bits(counts_b))
    null = _mi_null(agg, null_permutations, seed)
    del k
    return DomainSpecialisation(
        list(agg.domains), agg.meta.layers, share, ratio, lift, rate, mi, null, 1 / E, null_permutations
    )


def _mi_null(agg: CorpusAggregates, permutations: int, seed: int) -> np.ndarray:
    """(L,) 95th percentile of I(domain; expert) with document domains shuffled."""
    L = agg.num_layers
    if len(agg.docs) < 2 or len(agg.domains) < 2:
        return np.zeros(L)
    dom = pd.Categorical(agg.docs["domain"], categories=agg.domains).codes.astype(np.int64)  # (N,)
    loads = agg.doc_loads.astype(np.float64)  # (N, L, E)
    rng = np.random.default_rng(seed + 1)
    D = len(agg.domains)
    out = np.empty((permutations, L))
    for i in range(permutations):
        onehot = np.eye(D)[rng.permutation(dom)]  # (N, D)
        joint = np.einsum("nd,nle->lde", onehot, loads)  # (L, D, E)
        out[i] = mutual_information_bits(joint)
    return np.quantile(out, 0.95, axis=0)


# ------------------------------------------------------------------ vocabulary specialisation
@dataclass(frozen=True)
class VocabularySpecialisation:
    """OLMoE's vocabulary specialisation (Sec. 5, its routing-analysis script): for a token id v
    and the first-choice (top-1) expert of each of its occurrences, spec(v) = the share of v's
    occurrences that go to v's most frequent expert. ``kind`` is which token v is: the input
    token, the true next token, or the predicted next token. ``mean`` averages spec over token ids
    seen at least ``min_count`` times (the paper's script averages over every id; rare ids inflate
    it). ``baseline``: the same average for a token-blind router (each occurrence's first choice
    drawn from the layer's first-choice shares; ``token_blind_spec``), at the same counts. ``table``: one row per (layer, token) with enough occurrences."""

    kind: str
    layers: tuple[int, ...]
    min_count: int
    mean: Estimate  # (L,)
    baseline: np.ndarray  # (L,)
    tokens_counted: np.ndarray  # (L,) token ids with at least min_count occurrences
    table: pd.DataFrame  # layer, token, occurrences, expert, spec


def _spec_per_token(
    key_index: np.ndarray, expert: np.ndarray, counts: np.ndarray, n_keys: int, E: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (layer, token) key: occurrences, top expert, its share."""
    grid = np.bincount(key_index * E + expert, weights=counts, minlength=n_keys * E).reshape(n_keys, E)
    n = grid.sum(axis=1)
    return n, grid.argmax(axis=1), _div(grid.max(axis=1), n)


def token_blind_spec(n: np.ndarray, marginal: np.ndarray, seed: int, draws: int = 200) -> float:
    """Mean over tokens of the expected top-expert share if each of a token's n occurrences picked
    its first choice from the layer's ``marginal`` regardless of the token (Monte Carlo): what
    vocabulary specialisation shows for a router that ignores which token it sees. At small n
    this is well above the busiest expert's share (8 experts, n = 10: about 0.30, not 0.125)."""
    if len(n) == 0 or marginal.sum() <= 0:
        return float("nan")
    p = marginal / marginal.sum()
    rng = np.random.default_rng(seed)
    sizes, weight = np.unique(n.astype(np.int64), return_counts=True)
    expected = np.array([rng.multinomial(int(m), p, size=draws).max(axis=1).mean() / m for m in sizes])
    return float((expected * weight).sum() / weight.sum())


def vocabulary_specialisation(
    agg: CorpusAggregates, rs: Resampler, kind: str = "input", min_count: int = VOCAB_MIN_COUNT
) -> VocabularySpecialisation:
    if kind not in agg.vocab:
        raise ValueError(f"kind must be one of {sorted(agg.vocab)}; got {kind!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1; got {min_count!r}")
    v = agg.vocab[kind]
    L, E = agg.num_layers, agg.num_experts
    keys = v["layer"].to_numpy() * agg.meta.vocab_size + v["token"].to_numpy()
    uniq, key_index = np.unique(keys, return_inverse=True)
    expert = v["expert"].to_numpy()
    counts = v["count"].to_numpy().astype(np.float64)
    layer_of_key = uniq // agg.meta.vocab_size
    n, top, spec = _spec_per_token(key_index, expert, counts, len(uniq), E)

    def layer_means(n_: np.ndarray, spec_: np.ndarray) -> np.ndarray:
        keep = n_ >= min_count
        sums = np.bincount(layer_of_key[keep], weights=spec_[keep], minlength=L)
        num = np.bincount(layer_of_key[keep], minlength=L)
        return _div(sums, num)

    value = layer_means(n, spec)
    # Per-token counts are kept per vocabulary group (group mod VOCAB_GROUPS): resample those.
    vocab_tokens = np.bincount(
        np.arange(agg.num_groups) % VOCAB_GROUPS, weights=agg.tokens.sum(axis=1), minlength=VOCAB_GROUPS
    )
    live = np.flatnonzero(vocab_tokens > 0)
    rng = np.random.default_rng(rs.seed + 3)
    weights = rng.multinomial(len(live), np.full(len(live), 1 / len(live)), size=rs.weights.shape[0]).astype(float)
    group_pos = np.full(VOCAB_GROUPS, 0)
    group_pos[live] = np.arange(len(live))
    row_group = group_pos[v["group"].to_numpy()]
    reps = np.empty((rs.weights.shape[0], L))
    for b, w in enumerate(weights):
        wc = counts * w[row_group]
        n_b, _, spec_b = _spec_per_token(key_index, expert, wc, len(uniq), E)
        reps[b] = layer_means(n_b, spec_b)
    first, _ = rs.sums(agg.first)  # (L, D, E)
    per_expert = first.sum(axis=1)  # (L, E)
    keep_n = n >= min_count
    baseline = np.array(
        [token_blind_spec(n[keep_n & (layer_of_key == i)], per_expert[i], rs.seed + 4 + i) for i in range(L)]
    )
    keep = n >= min_count
    table = pd.DataFrame(
        {
            "layer": np.asarray(agg.meta.layers)[layer_of_key[keep]],
            "token": (uniq % agg.meta.vocab_size)[keep],
            "occurrences": n[keep].astype(np.int64),
            "expert": top[keep],
            "spec": spec[keep],
        }
    ).sort_values(["layer", "spec", "occurrences"], ascending=[True, False, False], ignore_index=True)
    counted = np.bincount(layer_of_key[keep], minlength=L)
    return VocabularySpecialisation(
        kind, agg.meta.layers, min_count, rs.estimate(value, reps), baseline, counted, table
    )


# ------------------------------------------------------------------ co-activation
@dataclass(frozen=True)
class CorpusCoactivation:
    """A[a, b] = tokens with a and b both in the set / tokens with a (OLMoE, directed), against
    independence (k - 1)/(E - 1). ``adjacent``: OLMoE's adjacent-rank variant (its routing-analysis
    script): only a and b at neighbouring ranks of the token's set sorted by router score count,
    both ways; independence gives 2(k - 1)/(k(E - 1))."""

    layers: tuple[int, ...]
    adjacent: bool
    matrix: Estimate  # (L, E, E), NaN on the diagonal and for unused a
    baseline: np.ndarray  # (L,)
    tokens: np.ndarray  # (L, E) tokens routed to each expert

    def strongest(self, layer_index: int, min_tokens: int = 30) -> tuple[int, int, float, float, float] | None:
        """(a, b, A, low, high) of the largest A[a, b] among experts a with at least min_tokens."""
        m = self.matrix.value[layer_index].copy()
        m[self.tokens[layer_index] < min_tokens] = np.nan
        if not np.isfinite(m).any():
            return None
        a, b = np.unravel_index(np.nanargmax(m), m.shape)
        return int(a), int(b), *self.matrix.at(layer_index, int(a), int(b))


def coactivation(agg: CorpusAggregates, rs: Resampler, adjacent: bool = False) -> CorpusCoactivation:
    E, L = agg.num_experts, agg.num_layers
    eye = np.eye(E, dtype=bool)
    value, low, high = (np.full((L, E, E), np.nan) for _ in range(3))
    diag = np.zeros((L, E))
    for li in range(L):  # one layer at a time: the resampled (B, E, E) arrays stay small at hundreds of experts
        pairs, pairs_b = rs.sums(agg.pairs[:, li])  # (E, E), (B, E, E)
        num, num_b = rs.sums(agg.adjacent[:, li]) if adjacent else (pairs, pairs_b)
        diag[li] = np.diagonal(pairs)
        v = _div(num, diag[li][:, None])
        reps = _div(num_b, np.diagonal(pairs_b, axis1=-2, axis2=-1)[..., None])
        v[eye], reps[:, eye] = np.nan, np.nan
        est = rs.estimate(v, reps)
        value[li], low[li], high[li] = est.value, est.low, est.high
    k = np.array(agg.meta.top_k, dtype=float)
    base = (k - 1) / (E - 1) if not adjacent else 2 * (k - 1) / (k * (E - 1))
    return CorpusCoactivation(agg.meta.layers, adjacent, Estimate(value, low, high, rs.level), base, diag)


# ------------------------------------------------------------------ reuse
@dataclass(frozen=True)
class CorpusReuse:
    """Consecutive-token reuse (Mixtral Table 5) per layer, and per layer x domain, within chunks,
    with random baselines: same first choice (1/E), sets intersect (1 - C(E-k,k)/C(E,k)), mean
    overlap |S_t ∩ S_t+1| (k^2/E)."""

    layers: tuple[int, ...]
    domains: list[str]
    pairs: np.ndarray  # (L,)
    first_choice_same: Estimate  # (L,)
    sets_intersect: Estimate  # (L,)
    mean_overlap: Estimate  # (L,)
    baselines: np.ndarray  # (L, 3): 1/E, 1 - C(E-k,k)/C(E,k), k^2/E
    by_domain_first_choice_same: Estimate  # (L, D)
    by_domain_sets_intersect: Estimate  # (L, D)


def reuse(agg: CorpusAggregates, rs: Resampler) -> CorpusReuse:
    rd, rd_b = rs.sums(agg.reuse)  # (L, D, 4), (B, L, D, 4)
    r, r_b = rd.sum(axis=1), rd_b.sum(axis=2)  # (L, 4), (B, L, 4)
    est = [rs.estimate(_div(r[:, i], r[:, 0]), _div(r_b[..., i], r_b[..., 0])) for i in (1, 2, 3)]
    by_domain = [rs.estimate(_div(rd[..., i], rd[..., 0]), _div(rd_b[..., i], rd_b[..., 0])) for i in (1, 2)]
    base = np.array([reuse_baselines(agg.num_experts, min(k, agg.num_experts)) for k in agg.meta.top_k])
    return CorpusReuse(agg.meta.layers, list(agg.domains), r[:, 0], *est, base, *by_domain)


# ------------------------------------------------------------------ coverage and dormant experts
@dataclass(frozen=True)
class Coverage:
    """Share of a layer's assignments taken by its N busiest experts, N = 1..E (ranked anew in
    every resample); uniform routing gives N/E."""

    layers: tuple[int, ...]
    curve: Estimate  # (L, E)

    def experts_for(self, layer_index: int, share: float) -> int:
        """Fewest experts that take at least ``share`` of the layer's assignments."""
        return int(np.searchsorted(self.curve.value[layer_index], share - 1e-12) + 1)


def coverage(agg: CorpusAggregates, rs: Resampler) -> Coverage:
    load, load_b = rs.sums(agg.assigned.sum(axis=2))  # (L, E), (B, L, E)

    def curve(x: np.ndarray) -> np.ndarray:
        ranked = -np.sort(-x, axis=-1)
        return _div(np.cumsum(ranked, axis=-1), x.sum(axis=-1, keepdims=True))

    return Coverage(agg.meta.layers, rs.estimate(curve(load), curve(load_b)))


@dataclass(frozen=True)
class Dormant:
    """Experts never routed to after n tokens, as n grows, per layer: the median and a
    ``level`` band over ``orders`` random orders of the run's document groups; ``final`` = experts
    never routed to in the whole run."""

    layers: tuple[int, ...]
    tokens: np.ndarray  # (n,) grid of tokens seen
    median: np.ndarray  # (L, n)
    low: np.ndarray  # (L, n)
    high: np.ndarray  # (L, n)
    final: np.ndarray  # (L,)
    orders: int


def dormant(agg: CorpusAggregates, orders: int = 200, seed: int = 0, level: float = DEFAULT_LEVEL) -> Dormant:
    groups = np.flatnonzero(agg.tokens.sum(axis=1) > 0)
    sizes = agg.tokens.sum(axis=1)[groups].astype(np.float64)  # (n,)
    seen = agg.first_seen[groups].astype(np.float64)  # (n, L, E)
    total = sizes.sum()
    grid = np.unique(np.round(np.geomspace(1, max(total, 1), 60)))
    rng = np.random.default_rng(seed + 2)
    curves = np.empty((orders, agg.num_layers, len(grid)))
    for i in range(orders):
        order = rng.permutation(len(groups))
        before = np.concatenate([[0], np.cumsum(sizes[order])[:-1]])  # (n,)
        first = np.where(seen[order] >= 0, seen[order] + before[:, None, None], np.inf).min(axis=0)  # (L, E)
        curves[i] = (first[..., None] >= grid[None, None, :]).sum(axis=1)  # (L, n_grid)
    alpha = (1 - level) / 2
    final = (agg.first_seen[groups] < 0).all(axis=0).sum(axis=-1)  # (L,)
    return Dormant(
        agg.meta.layers,
        grid,
        np.median(curves, axis=0),
        np.quantile(curves, alpha, axis=0),
        np.quantile(curves, 1 - alpha, axis=0),
        final,
        orders,
    )


# ------------------------------------------------------------------ saturation and importance
@dataclass(frozen=True)
class Saturation:
    """Router saturation (OLMoE Sec. 5): per layer, the mean share |S ∩ S_ref| / k of a token's
    native top-k that the reference checkpoint also picks on the same input, and how often the
    first choice matches."""

    reference_model: str
    layers: tuple[int, ...]
    topk_overlap: Estimate  # (L,)
    first_choice_match: Estimate  # (L,)


def saturation(agg: CorpusAggregates, rs: Resampler, native_k: tuple[int, ...]) -> Saturation | None:
    if agg.meta.reference_model is None or agg.saturation[..., 2].sum() == 0:
        return None
    s, s_b = rs.sums(agg.saturation)  # (L, 3), (B, L, 3)
    k = np.asarray(native_k, dtype=float)
    overlap = rs.estimate(_div(s[:, 0], s[:, 2] * k), _div(s_b[..., 0], s_b[..., 2] * k))
    first = rs.estimate(_div(s[:, 1], s[:, 2]), _div(s_b[..., 1], s_b[..., 2]))
    return Saturation(agg.meta.reference_model, agg.meta.layers, overlap, first)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (average ranks for ties); NaN when constant."""
    ra = pd.DataFrame(a.reshape(-1, a.shape[-1])).rank(axis=1).to_numpy(copy=True)
    rb = pd.DataFrame(b.reshape(-1, b.shape[-1])).rank(axis=1).to_numpy(copy=True)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    return _div((ra * rb).sum(axis=1), den).reshape(a.shape[:-1])


@dataclass(frozen=True)
class CorpusImportance:
    """Causal importance on the sampled documents: mean change of next-token loss (nats per
    token) when an expert alone is ablated (rerouted to the next-best expert) in one layer, against
    its share of the layer's load over the whole corpus; per layer the Spearman correlation
    between |Δ loss| and load share, with its interval."""

    layers: tuple[int, ...]
    documents: int
    delta_loss: Estimate  # (L, E)
    load_share: np.ndarray  # (L, E)
    rank_correlation: Estimate  # (L,)


def importance(agg: CorpusAggregates, rs: Resampler) -> CorpusImportance | None:
    if agg.importance_scored.sum() == 0:
        return None
    imp, imp_b = rs.sums(agg.importance)  # (L, E), (B, L, E)
    n, n_b = rs.sums(agg.importance_scored)  # (), (B,)
    load, load_b = rs.sums(agg.assigned.sum(axis=2))  # (L, E), (B, L, E)
    delta = rs.estimate(_div(imp, n), _div(imp_b, n_b[:, None, None]))
    share = _div(load, load.sum(axis=-1, keepdims=True))
    share_b = _div(load_b, load_b.sum(axis=-1, keepdims=True))
    rho = rs.estimate(spearman(np.abs(delta.value), share), spearman(np.abs(_div(imp_b, n_b[:, None, None])), share_b))
    return CorpusImportance(agg.meta.layers, agg.meta.importance_docs, delta, share, rho)


# ------------------------------------------------------------------ loss and balance
@dataclass(frozen=True)
class DomainLoss:
    domains: list[str]
    loss: Estimate  # (D,) nats per token
    overall: Estimate  # ()


def domain_loss(agg: CorpusAggregates, rs: Resampler) -> DomainLoss:
    nll, nll_b = rs.sums(agg.nll)
    n, n_b = rs.sums(agg.scored)
    return DomainLoss(
        list(agg.domains),
        rs.estimate(_div(nll, n), _div(nll_b, n_b)),
        rs.estimate(_div(nll.sum(), n.sum()), _div(nll_b.sum(axis=1), n_b.sum(axis=1))),
    )


@dataclass(frozen=True)
class CorpusBalance:
    """Per layer: CV of expert load (0 = even) and MaxVio (max load / mean - 1), kept assignments."""

    layers: tuple[int, ...]
    cv: Estimate  # (L,)
    max_vio: Estimate  # (L,)
    drop_rate: Estimate  # (L,) dropped / assigned


def balance(agg: CorpusAggregates, rs: Resampler) -> CorpusBalance:
    kept_g = (agg.assigned - agg.dropped).sum(axis=2)  # (G, L, E)
    kept, kept_b = rs.sums(kept_g)
    dropped, dropped_b = rs.sums(agg.dropped.sum(axis=(2, 3)))
    assigned, assigned_b = rs.sums(agg.assigned.sum(axis=(2, 3)))

    def cv(x: np.ndarray) -> np.ndarray:
        return _div(x.std(axis=-1), x.mean(axis=-1))

    def max_vio(x: np.ndarray) -> np.ndarray:
        return _div(x.max(axis=-1), x.mean(axis=-1)) - 1

    return CorpusBalance(
        agg.meta.layers,
        rs.estimate(cv(kept), cv(kept_b)),
        rs.estimate(max_vio(kept), max_vio(kept_b)),
        rs.estimate(_div(dropped, assigned), _div(dropped_b, assigned_b)),
    )
