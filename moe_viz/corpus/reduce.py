"""One batch of a corpus run reduced to aggregates: a pure function of the batch's routing.

``reduce_batch`` takes what one padded forward recorded (per MoE layer: the experts the policy
chose, which were dropped, the router logits) plus where each token row came from (its document,
domain, resampling group, position in its chunk) and returns ``CorpusAggregates`` of that batch
alone. A run folds these with ``aggregates.merge``; nothing here knows about files or progress.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from .aggregates import VOCAB_GROUPS, CorpusAggregates, CorpusMeta, empty


@dataclass(frozen=True)
class LayerRouting:
    """What one MoE layer did to the batch's real tokens (N rows, padding removed)."""

    index: torch.Tensor  # (N, k') long: the experts the policy chose
    dropped: torch.Tensor  # (N, k') bool
    logits: torch.Tensor  # (N, E) router logits (the first choice is the highest-scoring expert of the set)
    native_index: torch.Tensor  # (N, k) the model's own choice (saturation compares these)


@dataclass(frozen=True)
class BatchRows:
    """Where each of the batch's N real token rows came from, in stream order."""

    doc: np.ndarray  # (N,) index into ``docs`` below
    position: np.ndarray  # (N,) position in its chunk
    chunk: np.ndarray  # (N,) chunk number within the batch
    token: np.ndarray  # (N,) input token id
    target: np.ndarray  # (N,) the next token in the chunk, -1 at a chunk's last token
    predicted: np.ndarray  # (N,) the most likely next token
    nll: np.ndarray  # (N,) float64: -log p(target), 0 where target is -1
    docs: pd.DataFrame  # ordinal, name, domain (one row per document in the batch, stream order)


def _bincount(flat: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> np.ndarray:
    return torch.bincount(flat, weights=weights, minlength=size).numpy()


def _sets(route: LayerRouting, E: int) -> torch.Tensor:
    """(N, E) bool: each row's expert set (dropped assignments included)."""
    sets = torch.zeros(route.index.shape[0], E, dtype=torch.bool)
    sets.scatter_(1, route.index, True)
    return sets


def _first_choice(route: LayerRouting, sets: torch.Tensor) -> torch.Tensor:
    """(N,) the highest-scoring expert in each row's set (scores are monotone in the logits)."""
    return route.logits.float().masked_fill(~sets, float("-inf")).argmax(dim=-1)


def _ranked(route: LayerRouting) -> torch.Tensor:
    """(N, k') each row's set sorted by router logit, highest first."""
    order = route.logits.float().gather(1, route.index).argsort(dim=1, descending=True, stable=True)
    return route.index.gather(1, order)


def _position_in_group(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(groups present, each row's group among them, each row's position among its group's rows)."""
    present, which = torch.unique(group, return_inverse=True)  # (n_g,), (N,)
    onehot = torch.nn.functional.one_hot(which, len(present))  # (N, n_g)
    position = onehot.cumsum(dim=0).gather(1, which.unsqueeze(1)).squeeze(1) - 1  # (N,)
    return present, which, position


def _first_seen(
    index: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor, torch.Tensor], G: int, E: int
) -> np.ndarray:
    """(G, E) tokens of each group in this batch before each expert's first assignment, -1 = never."""
    present, which, position = where
    keys = (which.unsqueeze(1) * E + index).reshape(-1)  # (N*k',)
    values = position.unsqueeze(1).expand_as(index).reshape(-1)
    never = torch.iinfo(torch.int64).max
    first = torch.full((len(present) * E,), never, dtype=torch.int64).scatter_reduce(0, keys, values, "amin")
    first = torch.where(first == never, torch.full_like(first, -1), first).reshape(len(present), E)
    out = np.full((G, E), -1, dtype=np.int64)
    out[present.numpy()] = first.numpy()
    return out


def _pair_counts(index: torch.Tensor, group: torch.Tensor, G: int, E: int) -> np.ndarray:
    """(G, E, E) tokens whose set holds a and b (diagonal: tokens routed to a), per group."""
    k = index.shape[1]
    if k * k <= 4 * E:  # few experts per token: count the k^2 (a, b) pairs of every row directly
        a = index.unsqueeze(2).expand(-1, k, k)  # (N, k, k)
        b = index.unsqueeze(1).expand(-1, k, k)
        flat = ((group.view(-1, 1, 1) * E + a) * E + b).reshape(-1)
        return _bincount(flat, G * E * E).reshape(G, E, E)
    sets = torch.zeros(index.shape[0], E).scatter_(1, index, 1.0)  # (N, E)
    out = np.zeros((G, E, E), dtype=np.int64)
    for g in torch.unique(group).tolist():
        s = sets[group == g]
        out[g] = (s.t() @ s).round().long().numpy()
    return out


def _vocab_keys(
    group: torch.Tensor, layer: int, token: np.ndarray, expert: torch.Tensor, keep: np.ndarray, L: int, V: int, E: int
) -> np.ndarray:
    """One int64 key per kept row: (vocabulary group, layer, token id, first-choice expert)."""
    g = group.numpy()[keep] % VOCAB_GROUPS
    return ((g * L + layer) * V + token[keep].astype(np.int64)) * E + expert.numpy()[keep]


def _vocab_frame(keys: np.ndarray, L: int, V: int, E: int) -> pd.DataFrame:
    """Counts of the keys, decoded into (group, layer, token, expert, count) rows, sorted."""
    uniq, count = np.unique(keys, return_counts=True)
    expert, rest = uniq % E, uniq // E
    token, rest = rest % V, rest // V
    layer, group = rest % L, rest // L
    return pd.DataFrame(
        {"group": group, "layer": layer, "token": token, "expert": expert, "count": count.astype(np.int64)}
    )


def reduce_batch(
    meta: CorpusMeta,
    rows: BatchRows,
    layers: list[LayerRouting],
    reference: list[LayerRouting] | None = None,
) -> CorpusAggregates:
    """Aggregates of one batch. ``reference``: per layer, a reference checkpoint's routing of the
    same tokens, for router saturation (native choices compared)."""
    G, E = meta.groups, meta.num_experts
    domains = list(dict.fromkeys(rows.docs["domain"].tolist()))
    D = len(domains)
    agg = empty(replace(meta, importance_docs=0), domains)
    doc_domain = np.array([domains.index(d) for d in rows.docs["domain"]], dtype=np.int64)  # (n_docs,)
    doc_group = rows.docs["ordinal"].to_numpy().astype(np.int64) % G  # (n_docs,)
    domain = torch.from_numpy(doc_domain[rows.doc])  # (N,)
    group = torch.from_numpy(doc_group[rows.doc])  # (N,)
    doc = torch.from_numpy(rows.doc.astype(np.int64))  # (N,)
    has_target = torch.from_numpy(rows.target >= 0)  # (N,)
    # Consecutive pairs: row t and t+1 of the same chunk.
    chunk = torch.from_numpy(rows.chunk.astype(np.int64))
    consecutive = (chunk[1:] == chunk[:-1]).nonzero().squeeze(1)  # (n_pairs,) index of the first row
    n_docs = len(rows.docs)
    bucket = torch.from_numpy(rows.position // meta.position_bucket).long()  # (N,)
    P = agg.positions.shape[1]
    vocab: dict[str, list[np.ndarray]] = {"input": [], "target": [], "predicted": []}
    L, V = len(layers), meta.vocab_size
    where = _position_in_group(group)
    doc_loads = np.zeros((n_docs, len(layers), E), dtype=np.int64)
    for li, route in enumerate(layers):
        k = route.index.shape[1]
        sets = _sets(route, E)  # (N, E)
        first = _first_choice(route, sets)  # (N,)
        flat_gde = ((group * D + domain).unsqueeze(1) * E + route.index).reshape(-1)  # (N*k',)
        agg.assigned[:, li] = _bincount(flat_gde, G * D * E).reshape(G, D, E)
        dropped_flat = flat_gde[route.dropped.reshape(-1)]
        agg.dropped[:, li] = _bincount(dropped_flat, G * D * E).reshape(G, D, E)
        agg.first[:, li] = _bincount((group * D + domain) * E + first, G * D * E).reshape(G, D, E)
        doc_loads[:, li] = _bincount((doc.unsqueeze(1) * E + route.index).reshape(-1), n_docs * E).reshape(n_docs, E)
        pos_flat = (bucket.clamp_max(P - 1).unsqueeze(1) * E + route.index).reshape(-1)
        agg.positions[li] = _bincount(pos_flat, P * E).reshape(P, E)
        agg.pairs[:, li] = _pair_counts(route.index, group, G, E)
        ranked = _ranked(route)  # (N, k')
        if k > 1:
            a, b = ranked[:, :-1], ranked[:, 1:]  # (N, k'-1) neighbouring ranks
            g_rep = group.unsqueeze(1).expand_as(a)
            both = torch.cat([(g_rep * E + a) * E + b, (g_rep * E + b) * E + a]).reshape(-1)
            agg.adjacent[:, li] = _bincount(both, G * E * E).reshape(G, E, E)
        if len(consecutive):
            t0, t1 = consecutive, consecutive + 1
            held = sets.numpy()  # numpy: torch's bool reductions are slow on small CPU tensors
            overlap = torch.from_numpy((held[t0.numpy()] & held[t1.numpy()]).sum(axis=1))  # (n_pairs,)
            gd = group[t0] * D + domain[t0]  # a pair lies in one chunk, so in one document and domain
            counted = [None, (first[t0] == first[t1]).double(), (overlap > 0).double(), overlap.double()]
            for i, weights in enumerate(counted):
                agg.reuse[:, li, :, i] = _bincount(gd, G * D, weights).round().astype(np.int64).reshape(G, D)
        agg.first_seen[:, li] = _first_seen(route.index, where, G, E)
        everywhere = np.ones(len(rows.token), dtype=bool)
        vocab["input"].append(_vocab_keys(group, li, rows.token, first, everywhere, L, V, E))
        vocab["target"].append(_vocab_keys(group, li, rows.target, first, has_target.numpy(), L, V, E))
        vocab["predicted"].append(_vocab_keys(group, li, rows.predicted, first, everywhere, L, V, E))
        if reference is not None:
            own_sets = torch.zeros_like(sets).scatter_(1, route.native_index, True)
            ref_sets = torch.zeros_like(sets).scatter_(1, reference[li].native_index, True)
            overlap = (ref_sets & own_sets).sum(dim=1).double()  # (N,)
            own_first = route.logits.float().masked_fill(~own_sets, float("-inf")).argmax(-1)
            ref_first = reference[li].logits.float().masked_fill(~ref_sets, float("-inf")).argmax(-1)
            same_first = (own_first == ref_first).double()
            agg.saturation[:, li, 0] = _bincount(group, G, overlap).round().astype(np.int64)
            agg.saturation[:, li, 1] = _bincount(group, G, same_first).round().astype(np.int64)
            agg.saturation[:, li, 2] = _bincount(group, G)
    gd = (group * D + domain).numpy()
    agg.tokens[:] = np.bincount(gd, minlength=G * D).reshape(G, D)
    agg.scored[:] = np.bincount(gd, weights=rows.target >= 0, minlength=G * D).reshape(G, D).round().astype(np.int64)
    agg.nll[:] = np.bincount(gd, weights=rows.nll, minlength=G * D).reshape(G, D)
    agg.vocab = {kind: _vocab_frame(np.concatenate(keys), L, V, E) for kind, keys in vocab.items()}
    per_doc_tokens = np.bincount(rows.doc, minlength=n_docs)
    docs = rows.docs[["ordinal", "name", "domain"]].reset_index(drop=True).copy()
    docs["group"] = doc_group
    docs["tokens"] = per_doc_tokens.astype(np.int64)
    docs["nll"] = np.bincount(rows.doc, weights=rows.nll, minlength=n_docs)
    docs["scored"] = np.bincount(rows.doc, weights=rows.target >= 0, minlength=n_docs).round().astype(np.int64)
    agg.docs = docs
    agg.doc_loads = doc_loads
    return agg
