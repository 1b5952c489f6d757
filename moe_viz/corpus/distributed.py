"""Run a corpus over a Ray cluster: the batches of ``run_corpus``, spread over a pool of actors.

    from moe_viz.corpus import open_source
    from moe_viz.corpus.distributed import run_corpus_ray
    agg = run_corpus_ray("./my-checkpoint", open_source("corpus/"), address="head:6379", workers=4)

The driver (this process) loads only the tokenizer and the model's config. It tokenizes the corpus
and packs its batches exactly as ``run_corpus`` does (``chunk_documents`` + ``pack_batches``), so
every batch, padding included, is the in-process run's batch: that is what keeps the counts equal
count for count, even in bfloat16 where a different padding can flip a near-tie. It cuts the list
of batches into contiguous shards (``SHARDS_PER_WORKER`` per worker, so a fast worker takes more
of them) and describes each shard by its chunks' places: (document, first token, length).

Ray Data schedules the shards: ``ray.data.from_items(shards).map_batches(ShardRunner,
compute=ActorPoolStrategy(size=workers), num_gpus=...)``. Each actor loads the model once (in
``__init__``, with ``moe_viz.load_model``), re-opens the corpus by its path, re-cuts its shard's
chunks, runs each batch with ``run.run_batch`` (the function ``run_corpus`` runs), folds them with
``aggregates.merge`` and returns the shard's aggregates, pickled. The driver merges the shards in
shard order with the same ``merge``: integer counts equal the in-process run's exactly; float sums
(losses, importance) differ only by the order of summation.

The corpus must be readable at the same path on every node (a shared or copied folder), and the
model loadable by its id or path there. A Ray run is not resumed part-way: resume is per whole run
(an out folder holding the finished run with the same settings is returned without running again).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..policies import Policy, policy_spec
from .aggregates import CorpusAggregates, empty, load, merge, save
from .run import (
    DEFAULT_TOKEN_BUDGET,
    Chunk,
    Progress,
    RunSettings,
    check_batching,
    check_native_only,
    check_record,
    chunk_with_tokenizer,
    fold_parts,
    pack_batches,
    resolve_window,
    run_batch,
    run_record,
    run_settings,
    start_over,
    within_max_tokens,
)
from .sources import CorpusSource, open_source

SHARDS_PER_WORKER = 4  # shards per actor: enough for load balance, few enough that each is many batches
INSTALL_HINT = "pip install 'moe-viz[distributed]'"


@dataclass(frozen=True)
class ChunkPlace:
    """Where a chunk is in the corpus: its document and the chunk's first token and length."""

    ordinal: int
    name: str  # the document's name, checked when an actor re-reads it
    start: int
    length: int


@dataclass(frozen=True)
class Shard:
    """Consecutive batches of a run, each a tuple of chunk places, and what they add to progress."""

    index: int
    batches: tuple[tuple[ChunkPlace, ...], ...]
    documents_finished: int  # documents whose last chunk is in this shard
    tokens: int


def _import_ray() -> Any:
    """The ``ray`` module with Ray Data; ImportError with the install command when it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray core
    except ImportError as err:
        raise ImportError(f"corpus runs on Ray need Ray Data: {INSTALL_HINT}") from err
    return ray


def _check_pool(workers: int, gpus_per_worker: float | None, cpus_per_worker: float) -> None:
    """ValueError naming the argument when the actor pool cannot be formed."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    if gpus_per_worker is not None and not (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker >= 0):
        raise ValueError(
            f"gpus_per_worker must be a number >= 0 or None (1 on a cluster with GPUs); got {gpus_per_worker!r}"
        )
    if not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ValueError(f"cpus_per_worker must be a number > 0; got {cpus_per_worker!r}")


def model_location(model_id: str | None) -> str:
    """The id or folder the actors load: ``None`` or ``"default"`` is the default model's folder
    (the ``model_id`` that ``load_model()`` gives it)."""
    from ..models import default_model_path

    if model_id is None or model_id == "default":
        return default_model_path()
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a hub id or a local folder; got {model_id!r}")
    return model_id.strip()


def load_tokenizer(model_id: str, trust_remote_code: bool = False) -> tuple[Any, int | None]:
    """The tokenizer of ``model_id`` (as ``load_model`` loads it) and the model's position limit
    (None when its config gives none), without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models import model_source

    source = model_source(model_id)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError / ValueError / KeyError variants
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"could not load the tokenizer of model {model_id!r}: {first}") from None
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return tokenizer, int(limit) if isinstance(limit, int) else None


# ---------------------------------------------------------------------------------- planning
def plan_shards(
    tokenizer: Any,
    source: CorpusSource,
    shards: int,
    *,
    window: int,
    token_budget: int,
    max_batch_chunks: int | None,
    max_documents: int | None,
    max_tokens: int | None,
) -> list[Shard]:
    """The run's batches, as ``run_corpus`` forms them, cut into at most ``shards`` contiguous
    shards of nearly equal numbers of batches. ValueError past ``max_tokens`` or on an empty corpus."""
    batches: list[tuple[ChunkPlace, ...]] = []
    chunks = chunk_with_tokenizer(tokenizer, source.documents(), window, max_documents)
    if max_tokens is not None:  # the same refusal as run_corpus, counted on the planning pass
        chunks = within_max_tokens(chunks, max_tokens)
    for batch in pack_batches(chunks, token_budget, max_batch_chunks):
        batches.append(tuple(ChunkPlace(c.doc.ordinal, c.doc.name, c.start, len(c.ids)) for c in batch))
    if not batches:
        raise ValueError(f"corpus source {source.path} produced no tokens")
    count = min(shards, len(batches))
    bounds = [round(i * len(batches) / count) for i in range(count + 1)]
    parts = [tuple(batches[a:b]) for a, b in zip(bounds, bounds[1:])]
    last_shard = {place.ordinal: i for i, part in enumerate(parts) for batch in part for place in batch}
    finished = Counter(last_shard.values())
    return [
        Shard(i, part, finished[i], sum(place.length for batch in part for place in batch))
        for i, part in enumerate(parts)
    ]


def shard_batches(tokenizer: Any, source: CorpusSource, shard: Shard, window: int) -> list[list[Chunk]]:
    """The shard's batches of chunks, re-cut from the source (its documents only are tokenized);
    ValueError when the source no longer holds the planned chunks."""
    places = [place for batch in shard.batches for place in batch]
    first, last = places[0].ordinal, places[-1].ordinal
    wanted = _documents_between(source, first, last)
    found = {(c.doc.ordinal, c.start): c for c in chunk_with_tokenizer(tokenizer, wanted, window)}
    batches = []
    for batch in shard.batches:
        chunks = []
        for place in batch:
            chunk = found.get((place.ordinal, place.start))
            if chunk is None or len(chunk.ids) != place.length or chunk.doc.name != place.name:
                raise ValueError(
                    f"corpus source {str(source.path)!r} changed during the run: document {place.ordinal} "
                    f"({place.name!r}) no longer has {place.length} tokens from token {place.start}"
                )
            chunks.append(chunk)
        batches.append(chunks)
    return batches


def _documents_between(source: CorpusSource, first: int, last: int) -> Iterator[Any]:
    """The source's documents with ordinals first..last (those before are read, not tokenized)."""
    for doc in source.documents():
        if doc.ordinal > last:
            return
        if doc.ordinal >= first:
            yield doc


# ---------------------------------------------------------------------------------- actors
class ShardRunner:
    """A Ray Data actor: loads the model once, then runs whole shards (one per input row)."""

    def __init__(
        self,
        model_id: str,
        reference_id: str | None,
        load_options: dict[str, Any],
        policy: Policy | None,
        source_options: dict[str, Any],
        settings: dict[str, Any],
    ) -> None:
        from ..models import load_model

        self.policy = policy
        self.error: ValueError | None = None
        # A ValueError here (a policy this model cannot run, a bad window) is kept and raised on
        # the first shard: Ray Data reports an error raised in __init__ only as a dead actor.
        try:
            self.model = load_model(model_id, **load_options)
            self.reference = load_model(reference_id, **load_options) if reference_id else None
            self.settings: RunSettings = run_settings(self.model, policy, reference=self.reference, **settings)
            self.source = open_source(**source_options)
        except ValueError as err:
            self.error = err

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"shard": indices, "plan": pickled Shards} -> {"shard": indices, "aggregates": pickled aggregates}."""
        if self.error is not None:
            raise self.error
        results = []
        for plan in rows["plan"]:
            shard: Shard = pickle.loads(plan)
            batches = shard_batches(self.model.tokenizer, self.source, shard, self.settings.window)
            name = self.source.describe()
            parts = (run_batch(self.model, b, self.policy, self.settings, name, self.reference) for b in batches)
            results.append(pickle.dumps(fold_parts(parts)))
        return {"shard": rows["shard"], "aggregates": np.array(results, dtype=object)}


@contextlib.contextmanager
def _ray_runtime(ray: Any, address: str | None) -> Iterator[None]:
    """Ray, initialised at ``address`` unless it already is; shut down at the end only when started here."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _data_context(ray: Any, progress_bars: bool) -> Iterator[None]:
    """Ray Data raising the actors' own exceptions (and, when asked, without its progress bars);
    the caller's settings are restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.raise_original_map_exception, ctx.enable_progress_bars)
    ctx.raise_original_map_exception = True
    ctx.enable_progress_bars = progress_bars and ctx.enable_progress_bars
    try:
        yield
    finally:
        ctx.raise_original_map_exception, ctx.enable_progress_bars = saved


def _shard_results(ray: Any, shards: list[Shard], runner_options: dict[str, Any], pool: dict[str, Any]) -> Iterator:
    """(shard index, aggregates) as the actors finish them, in any order."""
    rows = [{"shard": s.index, "plan": pickle.dumps(s)} for s in shards]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardRunner,
        fn_constructor_kwargs=runner_options,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool["workers"]),
        num_gpus=pool["gpus"],
        num_cpus=pool["cpus"],
    )
    try:
        for row in dataset.iter_rows():
            yield int(row["shard"]), pickle.loads(row["aggregates"])
    except ray.exceptions.RayTaskError as err:  # an actor's ValueError is the user's input: say it plainly
        if isinstance(err.cause, ValueError):
            raise ValueError(str(err.cause)) from None
        raise


def run_corpus_ray(
    model_id: str | None,
    source: CorpusSource,
    policy: Policy | None = None,
    *,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    out: str | Path | None = None,
    resume: bool = True,
    window: int | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch_chunks: int | None = None,
    groups: int | None = None,
    seed: int = 0,
    importance_every: int = 0,
    reference_id: str | None = None,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> CorpusAggregates:
    """Run model ``model_id`` (hub id or folder; None = the default model) over ``source`` on
    ``workers`` Ray actors and return the aggregates, equal to ``run_corpus``'s with the same
    settings (see the module docstring). Settings as ``run_corpus``; ``reference_id`` is the
    reference checkpoint for router saturation (each actor loads it too).

    ``address``: the Ray cluster (``"HEAD:6379"``, or ``"auto"``); None starts a local runtime,
    unless Ray is already initialised, which is then used (and left running). Each actor holds
    ``gpus_per_worker`` GPUs (default: 1 when the cluster has GPUs, else 0) and
    ``cpus_per_worker`` CPUs; ``device`` and ``dtype`` go to ``load_model`` (default: cuda on an
    actor with a GPU, else cpu). ``out``: the final aggregates are saved in ``out/aggregates``
    with ``out/run.json``; resume is per whole run (a finished run with the same settings there is
    returned as it is; a Ray run interrupted part-way starts over). ``progress`` is called as each
    shard finishes.
    """
    _check_pool(workers, gpus_per_worker, cpus_per_worker)
    ray = _import_ray()
    model_id = model_location(model_id)
    reference_id = model_location(reference_id) if reference_id is not None else None
    tokenizer, limit = load_tokenizer(model_id, trust_remote_code)
    window = resolve_window(window, limit)
    check_batching(window, token_budget, max_batch_chunks)
    check_native_only(policy, reference_id is not None, importance_every)
    folder = Path(out) if out is not None else None
    known = RunSettings(
        policy=policy_spec(policy),
        window=window,
        token_budget=token_budget,
        max_batch_chunks=max_batch_chunks,
        groups=groups or 0,  # 0 until the actors fill in the model's default
        seed=seed,
        importance_every=importance_every,
        max_documents=max_documents,
        reference_model=reference_id,
    )
    if folder is not None:
        finished = _finished_run(folder, known, source, model_id, groups_given=groups is not None, resume=resume)
        if finished is not None:
            return finished
    shards = plan_shards(
        tokenizer,
        source,
        workers * SHARDS_PER_WORKER,
        window=window,
        token_budget=token_budget,
        max_batch_chunks=max_batch_chunks,
        max_documents=max_documents,
        max_tokens=max_tokens,
    )
    with _ray_runtime(ray, address), _data_context(ray, progress_bars=progress is None):
        if gpus_per_worker is None:
            gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        load_options = {"device": device or (None if gpus_per_worker > 0 else "cpu"), "dtype": dtype}
        load_options["trust_remote_code"] = trust_remote_code
        runner_options = {
            "model_id": model_id,
            "reference_id": reference_id,
            "load_options": load_options,
            "policy": policy,
            "source_options": _source_options(source),
            "settings": {
                "window": window,
                "token_budget": token_budget,
                "max_batch_chunks": max_batch_chunks,
                "groups": groups,
                "seed": seed,
                "importance_every": importance_every,
                "max_documents": max_documents,
            },
        }
        pool = {"workers": workers, "gpus": gpus_per_worker, "cpus": cpus_per_worker}
        total = merge_in_shard_order(_shard_results(ray, shards, runner_options, pool), shards, progress)
    if folder is not None:
        record = run_record(replace(known, groups=total.meta.groups), source, model_id)
        check_record(folder, record)
        save(total, folder / "aggregates")
    return total


def merge_in_shard_order(
    results: Iterator[tuple[int, CorpusAggregates]],
    shards: list[Shard],
    progress: Callable[[Progress], None] | None = None,
) -> CorpusAggregates:
    """The shards' aggregates, arriving in any order, merged in shard order (a shard that arrives
    early waits for the ones before it); ``progress`` is called at each arrival."""
    start = time.perf_counter()
    waiting: dict[int, CorpusAggregates] = {}
    total: CorpusAggregates | None = None
    merged = documents = tokens = batches = 0
    documents_total = sum(s.documents_finished for s in shards)
    for index, part in results:
        waiting[index] = part
        shard = shards[index]
        documents, tokens, batches = (
            documents + shard.documents_finished,
            tokens + shard.tokens,
            batches + len(shard.batches),
        )
        while merged in waiting:
            part = waiting.pop(merged)
            total = merge(empty(replace(part.meta, importance_docs=0)) if total is None else total, part)
            merged += 1
        if progress is not None:
            progress(Progress(documents, documents_total, tokens, batches, time.perf_counter() - start))
    if total is None or merged != len(shards):
        raise RuntimeError(f"the Ray run returned {merged} of {len(shards)} shards")
    return total


def _source_options(source: CorpusSource) -> dict[str, Any]:
    """``open_source``'s arguments that re-open ``source`` on another process or node."""
    return {
        "path": str(source.path),
        "text_column": source.text_column,
        "domain_column": source.domain_column,
        "split": source.split,
        "max_chars": source.max_chars,
    }


def _finished_run(
    folder: Path, known: RunSettings, source: CorpusSource, model_id: str, *, groups_given: bool, resume: bool
) -> CorpusAggregates | None:
    """The aggregates of the same run finished in ``folder`` (None when there are none); ValueError
    when ``folder`` holds another run. ``resume=False`` clears the folder first."""
    if not resume:
        start_over(folder)
    path = folder / "run.json"
    if not path.exists():
        return None
    recorded = json.loads(path.read_text()).get("settings", {})
    groups = known.groups if groups_given else int(recorded.get("groups") or 0)  # the default is the model's
    check_record(folder, run_record(replace(known, groups=groups), source, model_id))
    return load(folder / "aggregates") if (folder / "aggregates" / "meta.json").exists() else None
