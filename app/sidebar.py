"""The shared sidebar: model picker, routing mode and its parameters, layer picker.

``render_sidebar`` draws it and returns a ``PageContext`` that every page reads through
``page_context()``; the pages never rebuild the policy themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from app.resources import (
    MODES,
    PRIORITIES,
    WEIGHTINGS,
    Keys,
    active_model_id,
    apply_query_params,
    config,
    display_name,
    get_model,
    loaded_model,
    policy_from_state,
)
from moe_viz import MoEModel, Policy

CONTEXT_KEY = "_page_context"

MODE_HELP = {
    "top-k": "Each token goes to its k highest-scoring experts; their outputs are mixed with the gate weights.",
    "capacity": "Top-k, but each expert takes at most C = ceil(factor × T × k / E) assignments; the rest are "
    "dropped. A token keeps its other experts; one that loses all of them rides the residual path (plus the shared "
    "expert, on models that have one).",
    "ensemble": "Every expert runs for every token, weighted by the router's own weight rule over all experts (gate) "
    "or equally (uniform: the model's scaling / E each).",
}


@dataclass
class PageContext:
    """What the sidebar decided for this run."""

    model: MoEModel | None
    policy: Policy | None
    layer: int | None
    model_error: str | None = None
    policy_error: str | None = None


def _model_section() -> MoEModel | None:
    cfg = config()
    st.subheader("Model")
    if cfg.allow_custom_models:
        source = st.radio(
            "Model source",
            ["default", "custom"],
            format_func=lambda s: (
                "Default model" if s == "default" else ("Allowed models" if cfg.hosted else "Hub id or local folder")
            ),
            key=Keys.MODEL_SOURCE,
            horizontal=True,
            label_visibility="collapsed",
        )
        if source == "custom":
            with st.form("custom_model_form", border=False):
                if cfg.hosted:  # hub ids from the operator's allow-list only
                    name = st.selectbox("Model", cfg.allowed_models, key=Keys.CUSTOM_MODEL)
                    trust = False
                else:
                    name = st.text_input(
                        "Hub id or local folder",
                        key=Keys.CUSTOM_MODEL,
                        placeholder="e.g. allenai/OLMoE-1B-7B-0924 or /models/my-moe",
                        help="A local folder with config.json, or a hub id (downloaded unless already cached; "
                        "large checkpoints need a lot of memory).",
                    )
                    trust = st.checkbox(
                        "Trust remote code",
                        key=Keys.TRUST_REMOTE_CODE,
                        help="Run the checkpoint's own Python code (only for checkpoints you trust). Off by default.",
                    )
                submitted = st.form_submit_button("Load model")
            if submitted:
                name = (name or "").strip()
                try:
                    if not name:
                        raise ValueError("model must be a hub id or a local folder; the box is empty")
                    get_model(name, trust)
                except ValueError as err:
                    st.session_state[Keys.MODEL_ERROR] = str(err)
                else:
                    st.session_state[Keys.ACTIVE_MODEL] = name
                    st.session_state[Keys.ACTIVE_TRUST] = trust
                    st.session_state[Keys.MODEL_ERROR] = None
        elif st.session_state.get(Keys.ACTIVE_MODEL) not in (None, cfg.default_model):
            st.session_state[Keys.ACTIVE_MODEL] = cfg.default_model
            st.session_state[Keys.ACTIVE_TRUST] = False
            st.session_state[Keys.MODEL_ERROR] = None
    if st.session_state.get(Keys.MODEL_ERROR):
        st.error(st.session_state[Keys.MODEL_ERROR])
    name = active_model_id()
    try:
        model = get_model(name, bool(st.session_state.get(Keys.ACTIVE_TRUST, False)))
    except ValueError as err:
        st.error(str(err))
        return None
    st.caption(
        f"**{display_name(name)}** · {model.architecture} · {model.num_experts} experts, top-{model.top_k} · "
        f"{len(model.moe_layers)} MoE of {model.num_layers} layers · device **{model.device}** ({str(model.dtype).replace('torch.', '')})"
    )
    st.caption(
        model.routing_summary.capitalize() + ".", help="`moe-viz inspect MODEL` lists every router's spec and check."
    )
    return model


def _clamp(key: str, low: float, high: float, default: float) -> None:
    """Keep a widget's stored value inside its current range (the model may have changed)."""
    value = st.session_state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        st.session_state[key] = default


def _reset_on_model_change(model: MoEModel) -> None:
    """When another model becomes active, widgets whose range depends on it start from its defaults
    (a slider whose range changes is a new widget; without this it would fall back to its minimum)."""
    if st.session_state.get(Keys.WIDGETS_FOR) == model.model_id:
        return
    st.session_state[Keys.WIDGETS_FOR] = model.model_id
    st.session_state[Keys.K] = model.top_k
    st.session_state[Keys.LAYER] = model.moe_layers[0]
    st.session_state.pop(Keys.POSITION, None)


def _settle_mode_state(model: MoEModel, mode: str) -> int | None:
    """Keep the stored k and capacity factor inside their ranges for ``model`` (the widgets draw
    what this leaves; ``quiet_context`` reads it without them). Returns the largest k, or None
    when the mode has no k."""
    cfg = config()
    k_max = None
    if mode in ("top-k", "capacity"):
        k_max = min(model.num_experts, cfg.max_k) if cfg.max_k else model.num_experts
        _clamp(Keys.K, 1, k_max, min(model.top_k, k_max))
    if mode == "capacity":
        low, high = cfg.min_capacity_factor, cfg.max_capacity_factor
        _clamp(Keys.FACTOR, low, high, min(max(1.0, low), high))
    return k_max


def _mode_section(model: MoEModel) -> None:
    st.subheader("Routing mode")
    mode = st.radio("Mode", MODES, key=Keys.MODE, horizontal=True, help="How tokens are sent to experts.")
    st.caption(MODE_HELP[mode])
    cfg = config()
    k_max = _settle_mode_state(model, mode)
    if k_max is not None and k_max > 1:
        st.slider(f"k (experts per token; the model uses {model.top_k})", 1, k_max, step=1, key=Keys.K)
    if mode == "capacity":
        st.slider(
            "Capacity factor",
            cfg.min_capacity_factor,
            cfg.max_capacity_factor,
            step=0.05,
            key=Keys.FACTOR,
            help="C = ceil(factor × T × k / E) assignments per expert over the T tokens of the prompt.",
        )
        st.radio(
            "Who keeps a slot when an expert is full",
            PRIORITIES,
            key=Keys.PRIORITY,
            horizontal=True,
            format_func=lambda p: "token position" if p == "position" else "gate weight",
        )
    if mode == "ensemble":
        st.radio(
            "Expert weights",
            WEIGHTINGS,
            key=Keys.WEIGHTING,
            horizontal=True,
            format_func=lambda w: "gate (the router's weights)" if w == "gate" else "uniform (equal weights)",
        )


def _settle_layer(model: MoEModel) -> int:
    """The stored layer, moved to the first MoE layer when ``model`` has no such layer."""
    if st.session_state.get(Keys.LAYER) not in model.moe_layers:
        st.session_state[Keys.LAYER] = model.moe_layers[0]
    return int(st.session_state[Keys.LAYER])


def _layer_section(model: MoEModel) -> int:
    _settle_layer(model)
    return int(st.selectbox("Layer", model.moe_layers, key=Keys.LAYER, format_func=lambda i: f"layer {i}"))


def _limits_section() -> None:
    cfg = config()
    with st.expander("Server limits" if cfg.hosted else "Limits", expanded=False):
        st.table({"setting": [r[0] for r in cfg.limit_rows()], "value": [r[1] for r in cfg.limit_rows()]})


def render_sidebar() -> PageContext:
    """Draw the sidebar and remember what it decided for the page of this run."""
    apply_query_params()
    with st.sidebar:
        model = _model_section()
        if model is None:
            ctx = PageContext(model=None, policy=None, layer=None, model_error="The model could not be loaded.")
        elif model.capture_only:  # routers moe-viz can record but not re-route: native routing only
            _reset_on_model_change(model)
            st.subheader("Routing mode")
            reasons = sorted({s.verification.reason for s in model.sites if s.verification.status != "verified"})
            partial = any(s.verification.status == "partial" for s in model.sites)
            st.info(
                (
                    "This model's routers have partial support: every page shows its native routing, and the Compare "
                    "page can still run capacity at the model's own k. "
                    if partial
                    else "This model's routers can only be recorded, not re-routed: every page shows its native routing. "
                )
                + (reasons[0][:1].upper() + reasons[0][1:] if reasons else "")
            )
            layer = _layer_section(model)
            ctx = PageContext(model=model, policy=None, layer=layer)
        else:
            _reset_on_model_change(model)
            _mode_section(model)
            layer = _layer_section(model)
            try:
                policy = policy_from_state(model)
                error = None
            except ValueError as err:
                policy, error = None, str(err)
                st.error(error)
            ctx = PageContext(model=model, policy=policy, layer=layer, policy_error=error)
        _limits_section()
    st.session_state[CONTEXT_KEY] = ctx
    return ctx


def quiet_context() -> PageContext | None:
    """What the sidebar decides for this run, by its own rules, without drawing it: for the run
    that sends Explore's first chart before the widgets (``app/first_paint.py``). None when the
    sidebar has something to show first: a model not loaded yet (its progress), a model error,
    settings the policy refuses."""
    if st.session_state.get(Keys.MODEL_ERROR):
        return None
    model = loaded_model(active_model_id(), bool(st.session_state.get(Keys.ACTIVE_TRUST, False)))
    if model is None:
        return None
    _reset_on_model_change(model)
    layer = _settle_layer(model)
    policy = None
    if not model.capture_only:
        _settle_mode_state(model, st.session_state.get(Keys.MODE, MODES[0]))
        try:
            policy = policy_from_state(model)
        except ValueError:
            return None
    ctx = PageContext(model=model, policy=policy, layer=layer)
    st.session_state[CONTEXT_KEY] = ctx
    return ctx


def page_context() -> PageContext:
    """The sidebar's decisions for this run (the entry point draws the sidebar before the page)."""
    ctx = st.session_state.get(CONTEXT_KEY)
    if ctx is None:  # a page run on its own (e.g. in a test): draw the sidebar now
        ctx = render_sidebar()
    return ctx
