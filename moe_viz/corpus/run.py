"""Run a model over a corpus under a routing policy and keep aggregates only.

    from moe_viz import load_model
    from moe_viz.corpus import open_source, run_corpus
    agg = run_corpus(load_model(), open_source("my_corpus/"), out="runs/mine")

Documents are tokenized and cut into chunks of at most ``window`` tokens; consecutive chunks
are packed into right-padded batches of at most ``token_budget`` tokens (padding included); each
batch runs once under the policy and is reduced to counts (``reduce.reduce_batch``) that are
folded into the running total with ``aggregates.merge``. With ``out``, the total is saved every
``checkpoint_every`` batches; a run started again with the same settings resumes after the last
saved batch, and the batches it forms are the same as an uninterrupted run's, so the result is
identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._hooks import Forward, active_call
from .._runs import _pad_id
from ..importance import _AblateOnePerRow
from ..models import MoEModel
from ..policies import Policy, policy_spec
from .aggregates import CorpusAggregates, CorpusMeta, empty, load, merge, save
from .reduce import BatchRows, LayerRouting, reduce_batch
from .sources import CorpusSource, Document

DEFAULT_WINDOW = 512
DEFAULT_TOKEN_BUDGET = 4096
MAX_GROUPS = 200
GROUP_CELLS = 2**24  # cap on G * L * E * E, the per-group co-activation counts
LOSS_BLOCK_ROWS = 512  # rows of logits turned to float32 at a time for the loss and the prediction
FOLD_EVERY = 16  # batches folded together before they join the run's total


@dataclass(frozen=True)
class Chunk:
    """At most ``window`` consecutive tokens of one document."""

    doc: Document
    ids: list[int]
    start: int = 0  # offset of the chunk's first token in its document


@dataclass(frozen=True)
class Progress:
    """Where a run stands, for a progress bar."""

    documents_done: int
    documents_total: int | None
    tokens_done: int
    batches_done: int
    elapsed_s: float

    @property
    def fraction(self) -> float | None:
        if not self.documents_total:
            return None
        return min(1.0, self.documents_done / self.documents_total)


@dataclass(frozen=True)
class RunSettings:
    """Everything besides the model and the source that decides a run's aggregates."""

    policy: str
    window: int
    token_budget: int
    max_batch_chunks: int | None
    groups: int
    seed: int
    importance_every: int
    max_documents: int | None
    reference_model: str | None


def default_groups(num_layers: int, num_experts: int) -> int:
    """Resampling groups: MAX_GROUPS, fewer when the per-group co-activation counts would be large."""
    return int(max(20, min(MAX_GROUPS, GROUP_CELLS // max(1, num_layers * num_experts * num_experts))))


def chunk_documents(
    model: MoEModel, documents: Iterator[Document], window: int, max_documents: int | None = None
) -> Iterator[Chunk]:
    """Each document tokenized with the model's tokenizer and cut into chunks of at most ``window`` tokens."""
    return chunk_with_tokenizer(model.tokenizer, documents, window, max_documents)


def chunk_with_tokenizer(
    tokenizer: Any, documents: Iterator[Document], window: int, max_documents: int | None = None
) -> Iterator[Chunk]:
    """``chunk_documents`` with a bare tokenizer: a driver that plans a run without loading the model."""
    for doc in documents:
        if max_documents is not None and doc.ordinal >= max_documents:
            return
        ids = tokenizer(doc.text)["input_ids"]
        if hasattr(ids, "tolist"):  # a tensor, (1, T) or (T,)
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        for start in range(0, len(ids), window):
            piece = ids[start : start + window]
            if piece:
                yield Chunk(doc, piece, start)


def pack_batches(chunks: Iterator[Chunk], token_budget: int, max_chunks: int | None = None) -> Iterator[list[Chunk]]:
    """Consecutive chunks grouped so that (chunks x longest chunk) <= ``token_budget`` and, when
    given, at most ``max_chunks`` chunks share a batch."""
    batch: list[Chunk] = []
    longest = 0
    for chunk in chunks:
        grown = max(longest, len(chunk.ids))
        full = max_chunks is not None and len(batch) >= max_chunks
        if batch and (full or grown * (len(batch) + 1) > token_budget):
            yield batch
            batch, grown = [], len(chunk.ids)
        batch.append(chunk)
        longest = grown
    if batch:
        yield batch


def _padded(model: MoEModel, batch: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids and (B, T) mask of real tokens."""
    T = max(len(c.ids) for c in batch)
    ids = torch.full((len(batch), T), _pad_id(model.tokenizer), dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for b, c in enumerate(batch):
        ids[b, : len(c.ids)] = torch.tensor(c.ids)
        mask[b, : len(c.ids)] = 1
    return ids, mask


def _layer_routing(call, valid: torch.Tensor, top_k: int) -> LayerRouting:  # noqa: ANN001 - LayerCall
    logits = call.logits[valid].float().cpu()  # (N, E)
    native = call.native_index[valid].long().cpu() if call.native_index is not None else None
    if native is None:
        native = logits.topk(top_k, dim=-1).indices
    if call.index is not None:
        index = call.index[valid].long().cpu()
        dropped = call.dropped[valid].cpu() if call.dropped is not None else torch.zeros_like(index, dtype=torch.bool)
    else:
        index, dropped = native, torch.zeros_like(native, dtype=torch.bool)
    return LayerRouting(index=index, dropped=dropped, logits=logits, native_index=native)


def _routings(model: MoEModel, forward: Forward, valid: torch.Tensor) -> list[LayerRouting]:
    """Each MoE layer's routing of the forward's real tokens, in the model's site order."""
    by_layer = {c.layer: c for c in forward.layers}
    return [_layer_routing(by_layer[site.layer], valid, site.spec.top_k) for site in model.sites]


def _forward(model: MoEModel, ids: torch.Tensor, mask: torch.Tensor, policy: Policy | None):  # noqa: ANN202
    with torch.inference_mode(), active_call(policy, token_mask=mask.to(model.device)) as recorder:
        logits = model.model(input_ids=ids.to(model.device), use_cache=False).logits  # (B, T, V)
    return logits, recorder.forwards[0]


def _token_rows(batch: list[Chunk], logits: torch.Tensor, mask: torch.Tensor) -> BatchRows:
    """Per real token row: document, chunk, position, token, next token, prediction, loss."""
    docs: list[Document] = list({id(c.doc): c.doc for c in batch}.values())
    doc_pos = {d.ordinal: i for i, d in enumerate(docs)}
    doc_col, pos_col, chunk_col, tok_col, tgt_col = [], [], [], [], []
    for b, c in enumerate(batch):
        n = len(c.ids)
        doc_col.append(np.full(n, doc_pos[c.doc.ordinal]))
        pos_col.append(np.arange(n))
        chunk_col.append(np.full(n, b))
        tok_col.append(np.asarray(c.ids))
        tgt_col.append(np.asarray(c.ids[1:] + [-1]))
    rows = mask.reshape(-1).nonzero().squeeze(1).to(logits.device)  # (N,) the real tokens
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V) in the model's dtype
    target = np.concatenate(tgt_col)
    want = torch.from_numpy(np.maximum(target, 0)).to(flat.device).unsqueeze(1)  # (N, 1)
    nll_all = torch.empty(len(rows), dtype=torch.float32)
    predicted = torch.empty(len(rows), dtype=torch.long)
    # In blocks of rows, so the float32 copy stays small and in cache: -log p(target) =
    # logsumexp(logits) - logit(target), no (N, V) log-softmax written.
    for start in range(0, len(rows), LOSS_BLOCK_ROWS):
        block = flat.index_select(0, rows[start : start + LOSS_BLOCK_ROWS]).float()  # (n, V)
        picked = block.gather(1, want[start : start + LOSS_BLOCK_ROWS]).squeeze(1)
        nll_all[start : start + LOSS_BLOCK_ROWS] = (block.logsumexp(-1) - picked).cpu()
        predicted[start : start + LOSS_BLOCK_ROWS] = block.argmax(-1).cpu()
    nll = np.where(target >= 0, nll_all.double().numpy(), 0.0)
    frame = pd.DataFrame(
        {"ordinal": [d.ordinal for d in docs], "name": [d.name for d in docs], "domain": [d.domain for d in docs]}
    )
    return BatchRows(
        doc=np.concatenate(doc_col),
        position=np.concatenate(pos_col),
        chunk=np.concatenate(chunk_col),
        token=np.concatenate(tok_col),
        target=target,
        predicted=predicted.numpy(),
        nll=nll,
        docs=frame,
    )


def _sampled_for_importance(doc: Document, every: int, seed: int) -> bool:
    return every > 0 and doc.ordinal % every == seed % every


def _importance(model: MoEModel, chunk: Chunk, agg: CorpusAggregates) -> None:
    """Add chunk's loss change with each expert ablated (reroute), per layer, against native routing."""
    ids = torch.tensor([chunk.ids])  # (1, T)
    if ids.shape[1] < 2 or not any(site.spec.substitutable for site in model.sites):
        return  # nothing to score, or no router moe-viz can re-route
    targets = ids[0, 1:].to(model.device)  # (T-1,)
    with torch.inference_mode(), active_call(None):
        native = model.model(input_ids=ids.to(model.device), use_cache=False).logits[0, :-1]  # (T-1, V)
    base = -native.float().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1).double().sum()
    g = chunk.doc.ordinal % agg.meta.groups
    for li, layer in enumerate(agg.meta.layers):
        site = next(s for s in model.sites if s.layer == layer)
        if not site.spec.substitutable:
            continue
        E = site.spec.num_experts
        with torch.inference_mode(), active_call(_AblateOnePerRow(layer)):
            logits = model.model(input_ids=ids.expand(E, -1).to(model.device), use_cache=False).logits  # (E, T, V)
        logp = logits[:, :-1].float().log_softmax(-1)  # (E, T-1, V)
        nll = -logp.gather(2, targets.expand(E, -1).unsqueeze(-1)).squeeze(-1).double().sum(dim=1)  # (E,)
        agg.importance[g, li] += (nll - base).cpu().numpy()
    agg.importance_scored[g] += ids.shape[1] - 1


def run_record(settings: RunSettings, source: CorpusSource, model_id: str) -> dict:
    """What ``out/run.json`` holds for a run: its settings, source, the source's fingerprint, model."""
    return {
        "settings": asdict(settings),
        "source": source.describe(),
        "source_fingerprint": source_fingerprint(source, settings.max_documents),  # edited files are another run
        "model": model_id,
    }


def check_record(folder: Path, wanted: dict) -> None:
    """Write ``folder/run.json`` (``wanted``), or refuse (ValueError naming what differs) when it
    already describes another run."""
    path = folder / "run.json"
    if path.exists():
        had = json.loads(path.read_text())
        if had != wanted:
            diff = [k for k in ("model", "source", "source_fingerprint") if had.get(k) != wanted[k]]
            diff += [k for k in wanted["settings"] if had.get("settings", {}).get(k) != wanted["settings"][k]]
            raise ValueError(
                f"out folder {str(folder)!r} holds a run with other settings ({', '.join(diff)} differ); "
                "choose another folder or start over with resume=False"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(wanted, indent=1))


def start_over(folder: Path) -> None:
    """Remove an earlier run's record, checkpoint and aggregates from ``folder``."""
    (folder / "run.json").unlink(missing_ok=True)
    for name in ("checkpoint", "aggregates"):
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def _meta(model: MoEModel, settings: RunSettings, source_name: str, forward, layer_ids: list[int]) -> CorpusMeta:  # noqa: ANN001
    ks = []
    for call in forward.layers:
        index = call.index if call.index is not None else call.native_index
        site = next(s for s in model.sites if s.layer == call.layer)
        ks.append(int(index.shape[1]) if index is not None else site.spec.top_k)
    vocab = int(model.model.get_input_embeddings().num_embeddings)
    return CorpusMeta(
        model_id=model.model_id,
        policy=settings.policy,
        layers=tuple(layer_ids),
        num_experts=model.num_experts,
        top_k=tuple(ks),
        vocab_size=vocab,
        window=settings.window,
        groups=settings.groups,
        position_bucket=max(1, -(-settings.window // 64)),
        source=source_name,
        seed=settings.seed,
        reference_model=settings.reference_model,
        native_top_k=tuple(next(s.spec.top_k for s in model.sites if s.layer == layer) for layer in layer_ids),
    )


def count_documents(source: CorpusSource, max_documents: int | None = None) -> int:
    """Documents in ``source`` (one pass over the text), capped at ``max_documents``."""
    n = 0
    for _ in source.documents():
        n += 1
        if max_documents is not None and n >= max_documents:
            break
    return n


def resolve_window(window: int | None, limit: int | None) -> int:
    """The chunk window: ``window``, else DEFAULT_WINDOW capped at the model's ``limit``; ValueError
    when it is outside 2..limit."""
    window = int(window or min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW))
    if window < 2 or (limit is not None and window > limit):
        raise ValueError(f"window must satisfy 2 <= window <= {limit or 'the model limit'}; got {window}")
    return window


def check_batching(window: int, token_budget: int, max_batch_chunks: int | None) -> None:
    """ValueError when ``token_budget`` or ``max_batch_chunks`` cannot batch chunks of ``window`` tokens."""
    if token_budget < window:
        raise ValueError(f"token_budget must be at least the window ({window} tokens); got {token_budget}")
    if max_batch_chunks is not None and (
        isinstance(max_batch_chunks, bool) or not isinstance(max_batch_chunks, int) or max_batch_chunks < 1
    ):
        raise ValueError(f"max_batch_chunks must be an integer >= 1 or None; got {max_batch_chunks!r}")


def check_native_only(policy: Policy | None, with_reference: bool, importance_every: int) -> None:
    """ValueError when router saturation (a reference) or causal importance is asked for under a
    policy other than native routing."""
    if with_reference and policy is not None:
        raise ValueError(
            "router saturation compares the two checkpoints' own (native) routing: run it with policy native, "
            f"not {policy_spec(policy)!r}"
        )
    if importance_every and policy is not None:
        raise ValueError(
            "causal importance ablates experts under the model's own (native) routing and compares with its load: "
            f"run it with policy native, not {policy_spec(policy)!r}"
        )


def run_settings(
    model: MoEModel,
    policy: Policy | None,
    *,
    window: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_chunks: int | None = None,
    groups: int | None = None,
    seed: int = 0,
    importance_every: int = 0,
    max_documents: int | None = None,
    reference: MoEModel | None = None,
) -> RunSettings:
    """The checked settings of a run of ``model`` under ``policy`` (defaults filled in); ValueError
    naming the argument when the model, the policy or a setting does not allow the run."""
    if model.capture_only and policy is not None:
        raise ValueError("this model's routers can only be captured: a corpus run needs policy=None (native routing)")
    if not model.sites:
        raise ValueError("this model has no MoE router moe-viz can read")
    if policy is not None:
        model.instrumentation.check(policy)
    window = resolve_window(window, model.max_positions)
    check_batching(window, token_budget, max_batch_chunks)
    check_native_only(policy, reference is not None, importance_every)
    if reference is not None and (
        reference.moe_layers != model.moe_layers or reference.num_experts != model.num_experts
    ):
        raise ValueError(
            "reference must have the same MoE layers and experts as the model "
            f"(layers {model.moe_layers}, {model.num_experts} experts); got layers {reference.moe_layers}, "
            f"{reference.num_experts} experts"
        )
    return RunSettings(
        policy=policy_spec(policy),
        window=window,
        token_budget=token_budget,
        max_batch_chunks=max_batch_chunks,
        groups=int(groups or default_groups(len(model.sites), model.num_experts)),
        seed=seed,
        importance_every=importance_every,
        max_documents=max_documents,
        reference_model=reference.model_id if reference is not None else None,
    )


def run_batch(
    model: MoEModel,
    batch: list[Chunk],
    policy: Policy | None,
    settings: RunSettings,
    source_name: str,
    reference: MoEModel | None = None,
) -> CorpusAggregates:
    """One packed batch run under ``policy`` and reduced to its aggregates (with the reference's
    routing of the same batch, and the causal importance of its sampled documents, when the
    settings ask for them). Every engine runs its batches through this function."""
    layer_ids = [s.layer for s in model.sites]
    ids, mask = _padded(model, batch)
    logits, forward = _forward(model, ids, mask, policy)
    valid = mask.reshape(-1).bool().to(model.device)
    meta = _meta(model, settings, source_name, forward, layer_ids)
    rows = _token_rows(batch, logits, mask)
    del logits
    routing = _routings(model, forward, valid)
    ref = None
    if reference is not None:
        ref = _routings(reference, _forward(reference, ids, mask, None)[1], valid)
    part = reduce_batch(meta, rows, routing, ref)
    part.chunks_done = len(batch)
    part.documents_done = batch[-1].doc.ordinal + 1
    for chunk in batch:
        if _sampled_for_importance(chunk.doc, settings.importance_every, settings.seed):
            if chunk.start == 0:
                part.meta = replace(part.meta, importance_docs=part.meta.importance_docs + 1)
            _importance(model, chunk, part)
    return part


def fold_parts(parts: Iterator[CorpusAggregates]) -> CorpusAggregates | None:
    """The parts merged in stream order, as ``run_corpus`` folds them (None when there are none):
    into a small pending total, which joins the running total every FOLD_EVERY parts."""
    total: CorpusAggregates | None = None
    pending: CorpusAggregates | None = None
    for n, part in enumerate(parts, start=1):
        if total is None:
            total = empty(replace(part.meta, importance_docs=0))
        pending = part if pending is None else merge(pending, part)
        if n % FOLD_EVERY == 0:
            total, pending = merge(total, pending), None
    if total is not None and pending is not None:
        total = merge(total, pending)
    return total


def run_corpus(
    model: MoEModel,
    source: CorpusSource,
    policy: Policy | None = None,
    *,
    out: str | Path | None = None,
    window: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_chunks: int | None = None,
    groups: int | None = None,
    seed: int = 0,
    importance_every: int = 0,
    reference: MoEModel | None = None,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    checkpoint_every: int = 20,
    resume: bool = True,
    progress: Callable[[Progress], None] | None = None,
) -> CorpusAggregates:
    """Run ``model`` over ``source`` under ``policy`` and return the aggregates (saved in ``out``).

    ``importance_every`` = n > 0 ablates each expert of each MoE layer, one at a time, on every n-th
    document (from the seed's offset), for causal importance. ``reference``: another checkpoint of
    the same architecture and tokenizer, run on the same batches, for router saturation.
    ``max_tokens``: refuse (ValueError, before any forward) a corpus longer than this many tokens.
    ``max_batch_chunks`` = 1 runs every chunk alone: the counts then equal per-prompt traces bit
    for bit (padded batches can flip a near-tie by float rounding, in bfloat16 especially).
    ``progress`` is called after every batch; raising from it stops the run (the last checkpoint
    stays, so it can resume). ``moe_viz.corpus.distributed.run_corpus_ray`` runs the same batches
    over a Ray cluster.
    """
    settings = run_settings(
        model,
        policy,
        window=window,
        token_budget=token_budget,
        max_batch_chunks=max_batch_chunks,
        groups=groups,
        seed=seed,
        importance_every=importance_every,
        max_documents=max_documents,
        reference=reference,
    )
    window = settings.window
    folder = Path(out) if out is not None else None
    total: CorpusAggregates | None = None
    if folder is not None:
        if not resume:  # starting over: nothing of an earlier run may be resumed later
            start_over(folder)
        check_record(folder, run_record(settings, source, model.model_id))
        if resume and (folder / "checkpoint" / "meta.json").exists():
            total = load(folder / "checkpoint")
    skip = total.chunks_done if total is not None else 0
    if max_tokens is not None:
        for _ in within_max_tokens(chunk_documents(model, source.documents(), window, max_documents), max_tokens):
            pass  # refused before any forward
    documents_total = count_documents(source, max_documents)
    start = time.perf_counter()
    batches_done = 0
    tokens_done = total.total_tokens if total is not None else 0
    pending: CorpusAggregates | None = None
    chunks = chunk_documents(model, source.documents(), window, max_documents)
    for _ in range(skip):
        next(chunks, None)
    for batch in pack_batches(chunks, token_budget, max_batch_chunks):
        part = run_batch(model, batch, policy, settings, source.describe(), reference)
        if total is None:
            total = empty(replace(part.meta, importance_docs=0))
        # Batches fold into a small pending total, and that into the run's total every
        # FOLD_EVERY batches (and at each checkpoint): merging into the large total (its per-token
        # counts grow with the vocabulary seen) once per batch would cost more than the batch.
        pending = part if pending is None else merge(pending, part)
        batches_done += 1
        tokens_done += part.total_tokens
        checkpoint = folder is not None and batches_done % checkpoint_every == 0
        if checkpoint or batches_done % FOLD_EVERY == 0:
            total, pending = merge(total, pending), None
        if checkpoint:
            save(total, folder / "checkpoint")
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(Progress(part.documents_done, documents_total, tokens_done, batches_done, elapsed))
    if total is None:
        raise ValueError(f"corpus source {source.path} produced no tokens")
    if pending is not None:
        total = merge(total, pending)
    if folder is not None:
        save(total, folder / "checkpoint")
        save(total, folder / "aggregates")
    return total


def within_max_tokens(chunks: Iterator[Chunk], max_tokens: int) -> Iterator[Chunk]:
    """The chunks, passed on; ValueError as soon as they hold more than ``max_tokens`` tokens."""
    tokens = 0
    for chunk in chunks:
        tokens += len(chunk.ids)
        if tokens > max_tokens:  # stop at the limit: an oversized corpus costs no more
            raise ValueError(
                f"the corpus is more than {max_tokens:,} tokens long; the limit here is {max_tokens:,} tokens"
            )
        yield chunk


def source_fingerprint(source: CorpusSource, max_documents: int | None = None) -> str:
    """12 hex digits of the documents' names and texts (what a cached run was computed on)."""
    digest = hashlib.sha256()
    for doc in source.documents():
        if max_documents is not None and doc.ordinal >= max_documents:
            break
        digest.update(f"{doc.name}\0{doc.domain}\0{doc.text}\0".encode())
    return digest.hexdigest()[:12]
