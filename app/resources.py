"""Cached model loaders, per-session results and session-state keys, kept in one place.

The model is shared by every session through ``st.cache_resource`` and is never mutated: the
routing policy is passed per call (``moe_viz`` sets it in a ContextVar inside the thread that
runs the forward). Results (traces, generations) are per session and live in ``st.session_state``.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st
import torch

from app.config import AppConfig, load_config
from moe_viz import (
    Busy,
    Capacity,
    ComputeGate,
    Ensemble,
    Generation,
    MoEModel,
    Policy,
    Sampling,
    TimeBudgetExceeded,
    TopK,
    Trace,
    generate,
    load_model,
    parse_policy,
    policy_spec,
    run_prompt,
)
from moe_viz.engines import recompute
from moe_viz.fragility import NoiseSensitivity, noise_sensitivity
from moe_viz.importance import Importance, expert_importance
from moe_viz.sweeps import DEFAULT_FACTORS, capacity_sweep, k_sweep


class Keys:
    """``st.session_state`` keys. Widget keys double as the settings they hold."""

    MODEL_SOURCE = "model_source"  # widget: "default" | "custom"
    CUSTOM_MODEL = "custom_model"  # widget: text of the hub id / folder
    ACTIVE_MODEL = "active_model"  # the model id the pages use
    MODEL_ERROR = "model_error"  # last model-loading error, shown in the sidebar
    LOADED = "loaded_models"  # model ids this session has seen load (to show progress once)
    PROMPT = "prompt"  # the shared prompt every page runs on
    MODE = "mode"  # widget: "top-k" | "capacity" | "ensemble"
    K = "k"  # widget
    FACTOR = "capacity_factor"  # widget
    PRIORITY = "capacity_priority"  # widget
    WEIGHTING = "ensemble_weighting"  # widget
    LAYER = "layer"  # widget
    TRUST_REMOTE_CODE = "trust_remote_code"  # widget (local mode only)
    ACTIVE_TRUST = "active_trust_remote_code"  # whether the active model was loaded with remote code
    QUERY_APPLIED = "query_params_applied"  # the URL's settings are read once per session
    WIDGETS_FOR = "widgets_for_model"  # the model id the k / layer widgets were set up for
    POSITION = "position"  # widget: selected token position
    TRACES = "traces"  # OrderedDict[(model, prompt, policy spec)] -> Trace
    EVICTED = "traces_evicted"  # traces the session's byte budget dropped since the page last said so
    GENERATIONS = "generations"  # dict[(model, prompt, spec, n)] -> Generation
    ANALYSES = "analyses"  # OrderedDict[(kind, model, prompt, args)] -> importance / sweep / noise results


MODES = ("top-k", "capacity", "ensemble")
PRIORITIES = ("position", "probs")
WEIGHTINGS = ("gate", "uniform")

T = TypeVar("T")


class RequestRefused(ValueError):
    """The server was too busy or the request ran past its time budget; shown like bad input."""


_threads_lock = threading.Lock()
_threads_set = False


def config() -> AppConfig:
    return load_config()


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_model(name: str, trust_remote_code: bool = False) -> MoEModel:
    """Load (once per process) and share. ValueErrors are not cached, so a retry can succeed."""
    global _threads_set
    threads = load_config().torch_threads
    with _threads_lock:
        if threads is not None and not _threads_set:
            torch.set_num_threads(threads)  # process-wide: set once, here
            _threads_set = True
    print(f"moe-viz: loading model {name}", file=sys.stderr, flush=True)  # once per process: launch tests read it
    model = load_model(name, trust_remote_code=trust_remote_code)
    _loaded_in_process.add((name, trust_remote_code))
    return model


# Models this process has loaded. The cache keeps the last four: a model it dropped reloads, so
# this can only err towards a reload, never towards a wrong model.
_loaded_in_process: set[tuple[str, bool]] = set()


@st.cache_resource(show_spinner=False)
def _compute_gate(slots: int) -> ComputeGate:
    """One gate per process: at most ``slots`` model computations at once, the rest queue."""
    return ComputeGate(slots)


def compute(work: Callable[[], T]) -> T:
    """Run ``work`` (a model computation) inside the server's compute gate and time budget.

    While queued, the page shows the session's place in the queue. Raises ``RequestRefused``
    when the wait or the time budget runs out.
    """
    cfg = config()
    try:
        if cfg.compute_slots is None:
            return work()
        gate = _compute_gate(cfg.compute_slots)
        notice = st.empty()

        def waiting(place: int) -> None:
            notice.info(f"Waiting for a free compute slot: {place} request(s) ahead of you, {gate.running} running.")

        with gate.slot(max_wait_s=cfg.max_wait_s, on_wait=waiting):
            notice.empty()
            return work()
    except (Busy, TimeBudgetExceeded) as err:
        raise RequestRefused(str(err)) from None


def get_model(name: str, trust_remote_code: bool = False) -> MoEModel:
    """The shared model ``name``; shows a status box the first time this session loads it.

    Raises ValueError (from ``moe_viz.load_model``) for an unknown id, a missing folder or a
    dense model, and for a model this server does not allow (hosted mode).
    """
    config().check_model_request(name, trust_remote_code)
    loaded: set[str] = st.session_state.setdefault(Keys.LOADED, set())
    if name in loaded:
        return _cached_model(name, trust_remote_code)
    if (name, trust_remote_code) in _loaded_in_process:  # loaded by the launcher or another session
        model = _cached_model(name, trust_remote_code)
        st.status(_ready_label(model), state="complete", expanded=False)  # ready: no "Loading" flash
    else:
        with st.status(f"Loading model `{name}` …", expanded=False) as status:
            try:
                model = _cached_model(name, trust_remote_code)
            except ValueError:
                status.update(label=f"Could not load `{name}`", state="error")
                raise
            status.update(label=_ready_label(model), state="complete")
    loaded.add(name)
    return model


def _ready_label(model: MoEModel) -> str:
    return f"Model ready: {model.architecture}, {model.num_experts} experts, top-{model.top_k}"


def loaded_model(name: str, trust_remote_code: bool = False) -> MoEModel | None:
    """The shared model ``name`` if this process has loaded it already, without the status box;
    None when it has not (or this server does not allow it): then ``get_model`` shows the load."""
    if (name, trust_remote_code) not in _loaded_in_process:
        return None
    try:
        config().check_model_request(name, trust_remote_code)
    except ValueError:
        return None
    return _cached_model(name, trust_remote_code)


def display_name(model_id: str) -> str:
    """A short name for a model: the folder name for the shipped default, else the id as given."""
    from pathlib import Path

    if model_id == config().default_model and Path(model_id).is_dir():
        return f"{Path(model_id).name} (default)"
    return model_id if len(model_id) <= 48 else "…" + model_id[-47:]


def apply_query_params() -> None:
    """Start a session from its URL: ``?prompt=...&policy=capacity:1.0:probs`` (once per session).

    Shareable links, and how the load test gives every session its own prompt and mode. A bad
    value is reported and ignored.
    """
    if st.session_state.get(Keys.QUERY_APPLIED):
        return
    st.session_state[Keys.QUERY_APPLIED] = True
    params = st.query_params
    prompt = params.get("prompt")
    if prompt is not None:
        st.session_state[Keys.PROMPT] = prompt[: config().max_prompt_chars]
    spec = params.get("policy")
    if spec is None:
        return
    try:
        policy = parse_policy(spec)
    except ValueError as err:
        st.warning(f"Ignored the link's policy: {err}")
        return
    if policy is None:
        return
    if not isinstance(policy, (TopK, Capacity, Ensemble)):  # the sidebar's three modes; others live on Compare
        st.warning(f"The sidebar has no control for the link's policy `{policy.spec}`; type it on the Compare page.")
        return
    if isinstance(policy, Ensemble):
        st.session_state[Keys.MODE], st.session_state[Keys.WEIGHTING] = "ensemble", policy.weighting
        return
    st.session_state[Keys.MODE] = "top-k" if isinstance(policy, TopK) else "capacity"
    if policy.k is not None:
        st.session_state[Keys.K] = policy.k
        st.session_state[Keys.WIDGETS_FOR] = active_model_id()  # keep the link's k on first load
    if isinstance(policy, Capacity):
        st.session_state[Keys.FACTOR], st.session_state[Keys.PRIORITY] = policy.factor, policy.priority


def active_model_id() -> str:
    return st.session_state.get(Keys.ACTIVE_MODEL) or config().default_model


def current_prompt() -> str:
    return st.session_state.get(Keys.PROMPT, config().default_prompt)


def policy_from_state(model: MoEModel) -> Policy:
    """The policy the sidebar describes. Raises ValueError for out-of-range values."""
    mode = st.session_state.get(Keys.MODE, "top-k")
    k = int(st.session_state.get(Keys.K, model.top_k))
    if not 1 <= k <= model.num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= {model.num_experts} (the number of experts); got {k}")
    if mode == "top-k":
        return TopK(k)
    if mode == "capacity":
        return Capacity(
            float(st.session_state.get(Keys.FACTOR, 1.0)),
            k=None if k == model.top_k else k,  # None: the model's own k (and the shorter spec)
            priority=st.session_state.get(Keys.PRIORITY, "position"),
        )
    if mode == "ensemble":
        return Ensemble(st.session_state.get(Keys.WEIGHTING, "gate"))
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def get_trace(model: MoEModel, prompt: str, policy: Policy | None) -> Trace:
    """This session's trace of ``prompt`` under ``policy`` (computed once, then reused).

    Raises ValueError for an empty or too long prompt or a policy the model cannot run.
    """
    cache: OrderedDict[tuple[str, str, str], Trace] = st.session_state.setdefault(Keys.TRACES, OrderedDict())
    key = (model.model_id, prompt, policy_spec(policy))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cfg = config()
    cfg.limits.check_policy(policy, model.num_experts, model.top_k)
    trace = compute(
        lambda: run_prompt(model, prompt, policy, max_tokens=cfg.max_prompt_tokens, time_budget_s=cfg.time_budget_s)
    )
    cache[key] = trace
    evict_traces(cache, cfg.traces_per_session, cfg.session_mb)
    return trace


def evict_traces(cache: OrderedDict[Any, Trace], max_traces: int, budget_mb: int | None) -> int:
    """Drop the oldest traces until at most ``max_traces`` remain and, with a budget, their bytes
    fit in ``budget_mb`` MiB (the newest always stays). Records how many went, for the page to say."""
    evicted = 0
    while len(cache) > max_traces or (
        budget_mb and len(cache) > 1 and sum(t.nbytes() for t in cache.values()) > budget_mb * 2**20
    ):
        cache.popitem(last=False)
        evicted += 1
    if evicted:
        st.session_state[Keys.EVICTED] = st.session_state.get(Keys.EVICTED, 0) + evicted
    return evicted


def evicted_note() -> str | None:
    """What the budget did this session, once: the page shows it under the run."""
    n = st.session_state.pop(Keys.EVICTED, 0)
    cfg = config()
    if not n or not cfg.session_mb:
        return None
    return (
        f"To keep this session within {cfg.session_mb} MiB, {n} older trace{'s' * (n != 1)} "
        f"{'were' if n != 1 else 'was'} dropped from memory; going back to one computes it again."
    )


def get_generation(
    model: MoEModel,
    prompt: str,
    policy: Policy | None,
    max_new_tokens: int,
    progress: Callable[[int, int], Any] | None = None,
) -> Generation:
    """This session's greedy generation under ``policy`` (computed once per settings)."""
    cfg = config()
    cfg.limits.check_new_tokens(max_new_tokens)
    cfg.limits.check_policy(policy, model.num_experts, model.top_k)
    cache: dict[tuple[str, str, str, int], Generation] = st.session_state.setdefault(Keys.GENERATIONS, {})
    key = (model.model_id, prompt, policy_spec(policy), max_new_tokens)
    if key not in cache:
        cache[key] = compute(
            lambda: generate(
                model,
                prompt,
                policy,
                max_new_tokens=max_new_tokens,
                sampling=Sampling(temperature=0.0),
                progress=progress,
                max_tokens=cfg.max_prompt_tokens,
                time_budget_s=cfg.time_budget_s,
            )
        )
        if len(cache) > cfg.traces_per_session:
            cache.pop(next(iter(cache)))
    return cache[key]


def has_generation(model: MoEModel, prompt: str, policy: Policy | None, max_new_tokens: int) -> bool:
    key = (model.model_id, prompt, policy_spec(policy), max_new_tokens)
    return key in st.session_state.get(Keys.GENERATIONS, {})


def _analysis(kind: str, model: MoEModel, prompt: str, args: tuple[Any, ...], work: Callable[[], T]) -> T:
    cache: OrderedDict[tuple[Any, ...], Any] = st.session_state.setdefault(Keys.ANALYSES, OrderedDict())
    key = (kind, model.model_id, prompt, args)
    if key not in cache:
        cache[key] = compute(work)
        while len(cache) > config().traces_per_session:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def has_analysis(kind: str, model: MoEModel, prompt: str, args: tuple[Any, ...]) -> bool:
    return (kind, model.model_id, prompt, args) in st.session_state.get(Keys.ANALYSES, {})


def _prompt_tokens(model: MoEModel, prompt: str) -> int:
    return get_trace(model, prompt, None).num_tokens  # also checks the prompt (empty, too long)


def _ablated_layers(model: MoEModel) -> int:
    return sum(1 for site in model.sites if site.spec.substitutable)


def get_importance(model: MoEModel, prompt: str, mode: str) -> Importance:
    """The ablation grid: one batched forward of E copies of the prompt per MoE layer (bounded in
    hosted mode)."""
    cfg = config()
    T = _prompt_tokens(model, prompt)
    cfg.limits.check_analysis("The ablation grid", _ablated_layers(model), model.num_experts, T)
    return _analysis(
        "importance",
        model,
        prompt,
        (mode,),
        lambda: expert_importance(model, prompt, mode=mode, max_tokens=cfg.max_prompt_tokens),
    )


def get_capacity_sweep(model: MoEModel, prompt: str) -> tuple[Any, Any]:
    cfg = config()
    cfg.limits.check_analysis("The capacity sweep", 1, len(DEFAULT_FACTORS), _prompt_tokens(model, prompt))
    return _analysis("capacity_sweep", model, prompt, (), lambda: capacity_sweep(model, prompt))


def get_k_sweep(model: MoEModel, prompt: str) -> Any:
    cfg = config()
    cfg.limits.check_analysis("The k sweep", 1, model.num_experts, _prompt_tokens(model, prompt))
    return _analysis("k_sweep", model, prompt, (), lambda: k_sweep(model, prompt))


def get_noise(model: MoEModel, prompt: str) -> NoiseSensitivity:
    """Router-input noise at 1/5/10 %: one forward plus a router call per level and layer."""
    _prompt_tokens(model, prompt)
    cfg = config()
    return _analysis(
        "noise", model, prompt, (), lambda: noise_sensitivity(model, prompt, max_tokens=cfg.max_prompt_tokens)
    )


def noise_if_measured(model: MoEModel, prompt: str) -> NoiseSensitivity | None:
    if not has_analysis("noise", model, prompt, ()):
        return None
    return get_noise(model, prompt)


def get_recomputed(model: MoEModel, trace: Trace) -> Trace:
    """moe-viz's own native routing of an imported trace's tokens (for the agreement view), inside
    the compute gate and the server's limits."""
    cfg = config()
    return compute(lambda: recompute(trace, model, max_tokens=cfg.max_prompt_tokens, time_budget_s=cfg.time_budget_s))
