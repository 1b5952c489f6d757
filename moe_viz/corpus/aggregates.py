"""The aggregates of a corpus run: counts only, never per-token routing, merged by a pure sum.

Documents are spread over ``groups`` resampling groups (document n goes to group n mod G), and
every count that a statistic's confidence interval needs is kept per group, so the bootstrap can
resample groups of whole documents without the documents' routing. With no more documents than
groups each group is one document. Memory is set by the model's shape and G, not by the corpus
size (only ``docs``, a few numbers per document, grows with it).

Axes: G groups, L MoE layers (``layers`` gives their decoder-layer ids), D domains (``domains``,
in order of first appearance), E experts, P position buckets of ``position_bucket`` tokens.

``merge(a, b)`` is the one reduction: every per-batch aggregate of a run, and every shard's
aggregate of a distributed run, is folded with it, in stream order (``first_seen`` is the only
count whose merge depends on the order: b's documents come after a's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VOCAB_KINDS = ("input", "target", "predicted")
# Per-token counts are the one count that grows with the vocabulary seen; they are kept per
# vocabulary group (group mod VOCAB_GROUPS), coarser than the other counts, to bound their size.
VOCAB_GROUPS = 20
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CorpusMeta:
    """What was run: the model, the policy, the shape of the counts."""

    model_id: str
    policy: str
    layers: tuple[int, ...]
    num_experts: int
    top_k: tuple[int, ...]  # experts per token applied in each MoE layer (k'; E under ensemble)
    vocab_size: int
    window: int  # tokens per chunk (the model's window or the run's cap)
    groups: int
    position_bucket: int
    source: str = ""
    seed: int = 0
    reference_model: str | None = None  # the checkpoint saturation was measured against
    importance_docs: int = 0  # documents whose experts were ablated one by one
    native_top_k: tuple[int, ...] = ()  # each MoE layer's own k (saturation compares native choices)
    unit: str = "document"  # what a resampling unit is: a document, or an engine's recorded step (count imports)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "layers": list(self.layers), "top_k": list(self.top_k), "native_top_k": list(self.native_top_k)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> CorpusMeta:
        known = {f.name for f in fields(CorpusMeta)}
        d = {k: v for k, v in d.items() if k in known}
        tuples = {name: tuple(d.get(name, ())) for name in ("layers", "top_k", "native_top_k")}
        return CorpusMeta(**{**d, **tuples})


@dataclass
class CorpusAggregates:
    """Counts of a corpus run (numpy int64 unless noted). See the module docstring for the axes."""

    meta: CorpusMeta
    domains: list[str]
    assigned: np.ndarray  # (G, L, D, E) assignments the policy chose (dropped ones included)
    dropped: np.ndarray  # (G, L, D, E) of those, dropped for capacity
    first: np.ndarray  # (G, L, D, E) tokens whose first choice (highest score in the set) is e
    tokens: np.ndarray  # (G, D) tokens
    nll: np.ndarray  # (G, D) float64: summed next-token loss (nats) over tokens with a next token
    scored: np.ndarray  # (G, D) tokens with a next token in their chunk
    pairs: np.ndarray  # (G, L, E, E) tokens whose set holds a and b (diagonal: tokens routed to a)
    adjacent: np.ndarray  # (G, L, E, E) a and b at neighbouring ranks of a token's sorted set (both ways)
    reuse: np.ndarray  # (G, L, D, 4): consecutive pairs, same first choice, sets intersect, summed overlap
    positions: np.ndarray  # (L, P, E) assignments by position bucket in the chunk
    first_seen: np.ndarray  # (G, L, E) tokens of the group before e's first assignment, -1 = never
    saturation: np.ndarray  # (G, L, 3): summed |S ∩ S_ref|, same first choice, tokens (reference runs)
    importance: np.ndarray  # (G, L, E) float64: summed Δ next-token loss with e ablated (sampled docs)
    importance_scored: np.ndarray  # (G,) scored tokens of the ablated documents
    vocab: dict[str, pd.DataFrame] = field(
        default_factory=dict
    )  # kind -> group (vocab group), layer, token, expert, count
    docs: pd.DataFrame = field(default_factory=pd.DataFrame)  # ordinal, name, domain, group, tokens, nll, scored
    doc_loads: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int64))  # (N, L, E)
    chunks_done: int = 0
    documents_done: int = 0

    # ------------------------------------------------------------------ shape
    @property
    def num_groups(self) -> int:
        return self.meta.groups

    @property
    def num_layers(self) -> int:
        return len(self.meta.layers)

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    def layer_index(self, layer: int) -> int:
        """Position of decoder layer ``layer`` on the L axis; ValueError if it is not an MoE layer."""
        if layer not in self.meta.layers:
            raise ValueError(f"layer must be one of the MoE layers {list(self.meta.layers)}; got {layer!r}")
        return self.meta.layers.index(layer)

    def with_domains(self, domains: list[str]) -> CorpusAggregates:
        """The same counts on a domain axis extended to ``domains`` (a superset, any order)."""
        if domains == self.domains:
            return self
        missing = [d for d in self.domains if d not in domains]
        if missing:
            raise ValueError(f"domains must include {missing}")
        where = [domains.index(d) for d in self.domains]

        def spread(a: np.ndarray, axis: int) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = len(domains)
            out = np.zeros(shape, dtype=a.dtype)
            index = [slice(None)] * a.ndim
            index[axis] = where
            out[tuple(index)] = a
            return out

        return replace(
            self,
            domains=list(domains),
            assigned=spread(self.assigned, 2),
            dropped=spread(self.dropped, 2),
            first=spread(self.first, 2),
            reuse=spread(self.reuse, 2),
            tokens=spread(self.tokens, 1),
            nll=spread(self.nll, 1),
            scored=spread(self.scored, 1),
        )


def empty(meta: CorpusMeta, domains: list[str] | None = None) -> CorpusAggregates:
    """All-zero aggregates for ``meta`` (the identity of ``merge``)."""
    G, L, E = meta.groups, len(meta.layers), meta.num_experts
    D = len(domains or [])
    P = -(-meta.window // meta.position_bucket)
    i64 = np.int64
    return CorpusAggregates(
        meta=meta,
        domains=list(domains or []),
        assigned=np.zeros((G, L, D, E), i64),
        dropped=np.zeros((G, L, D, E), i64),
        first=np.zeros((G, L, D, E), i64),
        tokens=np.zeros((G, D), i64),
        nll=np.zeros((G, D)),
        scored=np.zeros((G, D), i64),
        pairs=np.zeros((G, L, E, E), i64),
        adjacent=np.zeros((G, L, E, E), i64),
        reuse=np.zeros((G, L, D, 4), i64),
        positions=np.zeros((L, P, E), i64),
        first_seen=np.full((G, L, E), -1, i64),
        saturation=np.zeros((G, L, 3), i64),
        importance=np.zeros((G, L, E)),
        importance_scored=np.zeros(G, i64),
        vocab={kind: _empty_vocab() for kind in VOCAB_KINDS},
        docs=_empty_docs(),
        doc_loads=np.zeros((0, L, E), i64),
    )


def _empty_vocab() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64") for c in ("group", "layer", "token", "expert", "count")})


def _empty_docs() -> pd.DataFrame:
    cols = {"ordinal": "int64", "name": "object", "domain": "object", "group": "int64"}
    cols |= {"tokens": "int64", "nll": "float64", "scored": "int64"}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols.items()})


def _check_compatible(a: CorpusMeta, b: CorpusMeta) -> None:
    for name in ("model_id", "policy", "layers", "num_experts", "top_k", "vocab_size", "window", "groups"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(
                f"aggregates of different runs cannot be merged: {name} is {getattr(a, name)!r} in one and "
                f"{getattr(b, name)!r} in the other"
            )


def _merge_first_seen(a: CorpusAggregates, b: CorpusAggregates) -> np.ndarray:
    """b's documents come after a's: an expert unseen in a's part of a group is first seen b's
    offset plus a's tokens into the group."""
    a_tokens = a.tokens.sum(axis=1)[:, None, None]  # (G, 1, 1)
    later = np.where(b.first_seen >= 0, b.first_seen + a_tokens, -1)
    return np.where(a.first_seen >= 0, a.first_seen, later)


def merge_vocab(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Sum of sparse (group, layer, token, expert) -> count tables, sorted by key."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_vocab()
    if len(frames) == 1:
        return frames[0]
    cols = ["group", "layer", "token", "expert"]
    parts = [np.stack([f[c].to_numpy(np.int64) for c in cols], axis=1) for f in frames]
    keys = np.concatenate(parts)  # (n, 4)
    counts = np.concatenate([f["count"].to_numpy(np.int64) for f in frames])
    # One int64 key per row (mixed radix over the columns' ranges), then a sort and a segment sum.
    span = keys.max(axis=0) + 1  # (4,)
    flat = ((keys[:, 0] * span[1] + keys[:, 1]) * span[2] + keys[:, 2]) * span[3] + keys[:, 3]
    uniq, inverse = np.unique(flat, return_inverse=True)
    summed = np.bincount(inverse, weights=counts, minlength=len(uniq)).round().astype(np.int64)
    expert, rest = uniq % span[3], uniq // span[3]
    token, rest = rest % span[2], rest // span[2]
    layer, group = rest % span[1], rest // span[1]
    return pd.DataFrame({"group": group, "layer": layer, "token": token, "expert": expert, "count": summed})


def merge(a: CorpusAggregates, b: CorpusAggregates) -> CorpusAggregates:
    """The aggregates of a's documents followed by b's: counts add, per-document rows concatenate."""
    _check_compatible(a.meta, b.meta)
    domains = a.domains + [d for d in b.domains if d not in a.domains]
    a, b = a.with_domains(domains), b.with_domains(domains)
    return CorpusAggregates(
        meta=replace(a.meta, importance_docs=a.meta.importance_docs + b.meta.importance_docs),
        domains=domains,
        assigned=a.assigned + b.assigned,
        dropped=a.dropped + b.dropped,
        first=a.first + b.first,
        tokens=a.tokens + b.tokens,
        nll=a.nll + b.nll,
        scored=a.scored + b.scored,
        pairs=a.pairs + b.pairs,
        adjacent=a.adjacent + b.adjacent,
        reuse=a.reuse + b.reuse,
        positions=a.positions + b.positions,
        first_seen=_merge_first_seen(a, b),
        saturation=a.saturation + b.saturation,
        importance=a.importance + b.importance,
        importance_scored=a.importance_scored + b.importance_scored,
        vocab={k: merge_vocab([a.vocab.get(k, _empty_vocab()), b.vocab.get(k, _empty_vocab())]) for k in VOCAB_KINDS},
        **_merge_docs(a, b),
        chunks_done=a.chunks_done + b.chunks_done,
        documents_done=max(a.documents_done, b.documents_done),
    )


def _merge_docs(a: CorpusAggregates, b: CorpusAggregates) -> dict[str, Any]:
    """Per-document rows and loads; a document cut between a and b (a chunk boundary between two
    batches) has a row in each, summed here."""
    if not len(a.docs) or not len(b.docs):
        docs = b.docs if not len(a.docs) else a.docs
        return {"docs": docs.reset_index(drop=True), "doc_loads": np.concatenate([a.doc_loads, b.doc_loads])}
    if int(a.docs["ordinal"].iloc[-1]) != int(b.docs["ordinal"].iloc[0]):
        docs = pd.concat([a.docs, b.docs], ignore_index=True)
        return {"docs": docs, "doc_loads": np.concatenate([a.doc_loads, b.doc_loads])}
    joined = a.docs.reset_index(drop=True).copy()
    last = len(joined) - 1
    for col in ("tokens", "nll", "scored"):
        joined.loc[last, col] = joined.loc[last, col] + b.docs[col].iloc[0]
    loads = np.concatenate([a.doc_loads, b.doc_loads[1:]])
    loads[len(joined) - 1] += b.doc_loads[0]
    return {"docs": pd.concat([joined, b.docs.iloc[1:]], ignore_index=True), "doc_loads": loads}


def equal(a: CorpusAggregates, b: CorpusAggregates) -> bool:
    """True when every count is identical (losses within float rounding), domains in any order."""
    if sorted(a.domains) != sorted(b.domains) or a.meta.layers != b.meta.layers:
        return False
    b = b.with_domains(a.domains) if set(a.domains) == set(b.domains) else b
    exact = ("assigned", "dropped", "first", "tokens", "scored", "pairs", "adjacent", "reuse", "positions")
    exact += ("first_seen", "saturation", "importance_scored", "doc_loads")
    if not all(np.array_equal(getattr(a, n), getattr(b, n)) for n in exact):
        return False
    close = all(np.allclose(getattr(a, n), getattr(b, n), rtol=1e-9, atol=1e-9) for n in ("nll", "importance"))
    vocab = all(a.vocab[k].reset_index(drop=True).equals(b.vocab[k].reset_index(drop=True)) for k in VOCAB_KINDS)
    docs = a.docs[["ordinal", "name", "domain", "group", "tokens", "scored"]].reset_index(drop=True)
    return close and vocab and docs.equals(b.docs[docs.columns].reset_index(drop=True))


# ---------------------------------------------------------------------------------- files
def _long(array: np.ndarray, names: list[str], value: str) -> pd.DataFrame:
    """A dense array as a long table (index columns + value), zeros left out."""
    index = np.nonzero(array)
    data = {n: idx.astype(np.int64) for n, idx in zip(names, index)}
    data[value] = array[tuple(index)]
    return pd.DataFrame(data)


def _dense(frame: pd.DataFrame, names: list[str], value: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The long table back as a dense array (zeros where it has no row)."""
    out = np.zeros(shape, dtype=dtype)
    if len(frame):
        out[tuple(frame[n].to_numpy() for n in names)] = frame[value].to_numpy()
    return out


TABLES = {
    # file stem: (array field, index column names, value column)
    "routing_assigned": ("assigned", ["group", "layer", "domain", "expert"], "count"),
    "routing_dropped": ("dropped", ["group", "layer", "domain", "expert"], "count"),
    "routing_first": ("first", ["group", "layer", "domain", "expert"], "count"),
    "tokens": ("tokens", ["group", "domain"], "count"),
    "loss": ("nll", ["group", "domain"], "nll"),
    "scored": ("scored", ["group", "domain"], "count"),
    "pairs": ("pairs", ["group", "layer", "a", "b"], "count"),
    "pairs_adjacent": ("adjacent", ["group", "layer", "a", "b"], "count"),
    "reuse": ("reuse", ["group", "layer", "domain", "stat"], "count"),
    "positions": ("positions", ["layer", "bucket", "expert"], "count"),
    "saturation": ("saturation", ["group", "layer", "stat"], "count"),
    "importance": ("importance", ["group", "layer", "expert"], "delta_nll"),
    "importance_scored": ("importance_scored", ["group"], "count"),
    "doc_loads": ("doc_loads", ["document", "layer", "expert"], "count"),
}


def save(agg: CorpusAggregates, folder: str | Path) -> Path:
    """Write the aggregates as Parquet tables plus ``meta.json`` into ``folder`` (created); the
    write is atomic per folder: a crash leaves the previous contents or the new ones."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for stem, (name, cols, value) in TABLES.items():
        array = getattr(agg, name)
        frame = _long(array, cols, value)
        frame.to_parquet(tmp / f"{stem}.parquet", index=False)
    _long(agg.first_seen + 1, ["group", "layer", "expert"], "offset_plus_one").to_parquet(
        tmp / "first_seen.parquet", index=False
    )
    for kind, frame in agg.vocab.items():
        frame.to_parquet(tmp / f"vocab_{kind}.parquet", index=False)
    agg.docs.to_parquet(tmp / "documents.parquet", index=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "meta": agg.meta.to_dict(),
        "domains": agg.domains,
        "documents": int(len(agg.docs)),
        "chunks_done": agg.chunks_done,
        "documents_done": agg.documents_done,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            _remove(old)
        folder.rename(old)
        tmp.rename(folder)
        _remove(old)
    else:
        tmp.rename(folder)
    return folder


def _remove(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def load(folder: str | Path) -> CorpusAggregates:
    """Aggregates written by ``save``; ValueError naming the folder when it is not one."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "meta.json").read_text())
        meta = CorpusMeta.from_dict(info["meta"])
        domains = list(info["domains"])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{str(folder)!r} is not a corpus run folder (meta.json unreadable: {exc})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"corpus run format {info.get('format_version')!r} is not {FORMAT_VERSION}")
    agg = empty(meta, domains)
    agg.doc_loads = np.zeros((int(info["documents"]), len(meta.layers), meta.num_experts), np.int64)
    try:
        for stem, (name, cols, value) in TABLES.items():
            current = getattr(agg, name)
            frame = pd.read_parquet(folder / f"{stem}.parquet")
            setattr(agg, name, _dense(frame, cols, value, current.shape, current.dtype))
        seen = pd.read_parquet(folder / "first_seen.parquet")
        agg.first_seen = (
            _dense(seen, ["group", "layer", "expert"], "offset_plus_one", agg.first_seen.shape, np.int64) - 1
        )
        agg.vocab = {k: pd.read_parquet(folder / f"vocab_{k}.parquet").astype("int64") for k in VOCAB_KINDS}
        agg.docs = pd.read_parquet(folder / "documents.parquet")
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"corpus run folder {str(folder)!r} is incomplete or damaged: {exc}") from None
    agg.chunks_done = int(info.get("chunks_done", 0))
    agg.documents_done = int(info.get("documents_done", 0))
    return agg
