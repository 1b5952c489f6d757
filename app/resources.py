"""Cached model loaders, per-session results and session-state keys, kept in one place.

The model is shared by every session through ``st.cache_resource`` and is never mutated: the
routing policy is passed per call (``moe_viz`` sets it in a ContextVar inside the thread that
runs the forward). Results (traces, generations) are per session and live in ``st.session_state``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import streamlit as st
import torch

from moe_viz import Capacity, Ensemble, MoEModel, Policy, Trace, TopK, generate, load_model, policy_spec, run_prompt
from moe_viz.runner import Generation, Sampling

from app.config import AppConfig, load_config


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
    WIDGETS_FOR = "widgets_for_model"  # the model id the k / layer widgets were set up for
    POSITION = "position"  # widget: selected token position
    TRACES = "traces"  # OrderedDict[(model, prompt, policy spec)] -> Trace
    GENERATIONS = "generations"  # dict[(model, prompt, spec, n)] -> Generation


MODES = ("top-k", "capacity", "ensemble")
PRIORITIES = ("position", "probs")
WEIGHTINGS = ("gate", "uniform")
TRACE_CACHE_SIZE = 24

_threads_lock = threading.Lock()
_threads_set = False


def config() -> AppConfig:
    return load_config()


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_model(name: str) -> MoEModel:
    """Load (once per process) and share. ValueErrors are not cached, so a retry can succeed."""
    global _threads_set
    threads = load_config().torch_threads
    with _threads_lock:
        if threads is not None and not _threads_set:
            torch.set_num_threads(threads)  # process-wide: set once, here
            _threads_set = True
    return load_model(name)


def get_model(name: str) -> MoEModel:
    """The shared model ``name``; shows a status box the first time this session loads it.

    Raises ValueError (from ``moe_viz.load_model``) for an unknown id, a missing folder or a
    dense model.
    """
    loaded: set[str] = st.session_state.setdefault(Keys.LOADED, set())
    if name in loaded:
        return _cached_model(name)
    with st.status(f"Loading model `{name}` …", expanded=False) as status:
        try:
            model = _cached_model(name)
        except ValueError:
            status.update(label=f"Could not load `{name}`", state="error")
            raise
        status.update(
            label=f"Model ready: {model.architecture}, {model.num_experts} experts, top-{model.top_k}",
            state="complete",
        )
    loaded.add(name)
    return model


def display_name(model_id: str) -> str:
    """A short name for a model: the folder name for the shipped default, else the id as given."""
    from pathlib import Path

    if model_id == config().default_model and Path(model_id).is_dir():
        return f"{Path(model_id).name} (default)"
    return model_id if len(model_id) <= 48 else "…" + model_id[-47:]


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
            k=k,
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
    trace = run_prompt(model, prompt, policy, max_tokens=config().max_prompt_tokens)
    cache[key] = trace
    while len(cache) > TRACE_CACHE_SIZE:
        cache.popitem(last=False)
    return trace


def get_generation(
    model: MoEModel,
    prompt: str,
    policy: Policy | None,
    max_new_tokens: int,
    progress: Callable[[int, int], Any] | None = None,
) -> Generation:
    """This session's greedy generation under ``policy`` (computed once per settings)."""
    limit = config().max_new_tokens
    if not 1 <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens must satisfy 1 <= max_new_tokens <= {limit}; got {max_new_tokens}")
    cache: dict[tuple[str, str, str, int], Generation] = st.session_state.setdefault(Keys.GENERATIONS, {})
    key = (model.model_id, prompt, policy_spec(policy), max_new_tokens)
    if key not in cache:
        cache[key] = generate(
            model,
            prompt,
            policy,
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=0.0),
            progress=progress,
            max_tokens=config().max_prompt_tokens,
        )
        if len(cache) > TRACE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
    return cache[key]


def has_generation(model: MoEModel, prompt: str, policy: Policy | None, max_new_tokens: int) -> bool:
    key = (model.model_id, prompt, policy_spec(policy), max_new_tokens)
    return key in st.session_state.get(Keys.GENERATIONS, {})
