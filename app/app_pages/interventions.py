"""Interventions: switch experts off or force them on, see which experts matter (ablation grid),
and how far two routings of the prompt agree."""

from __future__ import annotations

import math

import streamlit as st

from app.resources import config, get_generation, get_importance, get_trace, has_analysis, has_generation
from app.ui import (
    csv_download,
    downloads,
    prompt_form,
    require_model,
    require_policy,
    show,
    shows_errors,
    start_figures,
)
from moe_viz import Trace, agreement, metrics, parse_policy, policy_spec, trace_io, views

MAX_UPLOAD_BYTES = 64 * 2**20  # a trace of a few thousand tokens is a few MiB

st.title("Interventions")
ctx = require_model()
model, layer = ctx.model, ctx.layer
assert model is not None and layer is not None
prompt = prompt_form("interventions")
require_policy(ctx)
start_figures()
base_spec = policy_spec(ctx.policy)
with shows_errors():
    base = get_trace(model, prompt, ctx.policy)

# ----------------------------------------------------------------------------- one intervention
st.subheader("Switch experts off, or force them on")
busiest = int(metrics.expert_load(base.layer(layer)).argmax())
with st.form("intervention_form"):
    st.markdown(
        f"Chained onto the sidebar's mode (`{base_spec}`). Write `ablate:LAYER:E,E` (reroute: the expert's logit is "
        "masked and the next-best expert takes its slot), `ablate:LAYER:E,E:zero` (selection kept, the expert's "
        "weight set to 0, not renormalised), or `force:LAYER:E,E[@POS,POS]` (those tokens go to exactly these "
        "experts, weighted by the router's own rule); chain several with `+`."
    )
    spec = st.text_input("Intervention", value=f"ablate:{layer}:{busiest}", key="intervention_spec")
    st.form_submit_button("Apply", type="primary")

full_spec = f"{base_spec}+{spec.strip()}"
try:
    if not spec.strip():
        raise ValueError("intervention must not be empty; e.g. ablate:0:1")
    first = spec.strip().split("+")[0].split(":")[0].strip().lower()
    if first not in ("ablate", "force"):
        raise ValueError(
            f"intervention must start with ablate: or force: (the base mode is the sidebar's, {base_spec!r}); "
            f"got {spec.strip()!r}"
        )
    policy = parse_policy(full_spec)
    link = policy
    while link is not None:  # positions past the prompt would force nothing: say so rather than show no effect
        late = [p for p in getattr(link, "positions", None) or () if p >= base.num_tokens]
        if late:
            raise ValueError(
                f"positions must satisfy 0 <= position < {base.num_tokens} (the prompt's tokens); got {late[0]}"
            )
        link = getattr(link, "base", None)
    intervened = get_trace(model, prompt, policy)
except ValueError as err:
    st.error(f"Intervention {spec.strip()!r}: {err}")
    intervened = None

if intervened is not None:
    effect = metrics.mode_effect(base, intervened) if base.output.has_distribution else None
    cols = st.columns(4)
    cols[0].metric("Tokens routed differently (this layer)", metrics.routing_diff(base, intervened, layer).num_changed)
    if effect is not None:
        cols[1].metric("Mean KL(base ‖ intervened)", f"{effect.mean_kl:.3g} nats")
        cols[2].metric("Top-1 flips", f"{effect.flip_rate:.0%}", help="Positions whose most likely next token changed.")
        delta = effect.mean_delta_logprob
        cols[3].metric("Δ log p(actual next token)", "n/a" if math.isnan(delta) else f"{delta:+.3f}")
    for view in views.compare_views(base, intervened, layer):
        show(view, key=f"interventions_{view.name}")

    cfg = config()
    with st.form("intervention_generate"):
        new_tokens = st.slider("New tokens", 1, cfg.max_new_tokens, min(16, cfg.max_new_tokens), key="iv_new_tokens")
        generate_now = st.form_submit_button("Generate with and without the intervention")
    runs = [(base_spec, ctx.policy), (intervened.policy, policy)]
    if generate_now or all(has_generation(model, prompt, p, new_tokens) for _, p in runs):
        for col, (name, run_policy) in zip(st.columns(2), runs):
            with col, shows_errors():
                st.markdown(f"`{name}` (greedy)")
                st.code(prompt + get_generation(model, prompt, run_policy, new_tokens).text, language=None)

# ----------------------------------------------------------------------------- ablation grid
st.subheader("Which experts matter: the ablation grid")
cfg = config()
E, T = model.num_experts, base.num_tokens
layers = sum(1 for site in model.sites if site.spec.substitutable)
bound = (
    f" This server runs at most {cfg.max_analysis_tokens} token rows per analysis; this one needs {layers * E * T}."
    if cfg.max_analysis_tokens
    else ""
)
st.caption(
    f"Ablates each expert of each MoE layer in turn under the model's own routing and measures the change in the "
    f"prompt's mean next-token loss: {layers} batched forwards of {E} copies of the {T}-token prompt.{bound}"
)
with st.form("importance_form"):
    mode = st.radio("Ablation", ["reroute", "zero"], horizontal=True, key="importance_mode")
    run_grid = st.form_submit_button("Run the ablation grid")
if run_grid or has_analysis("importance", model, prompt, (mode,)):
    try:  # a refusal (hosted bound, a model whose routers cannot be re-routed) leaves the rest of the page
        with st.spinner("Ablating every expert, one batched forward per layer …"):
            imp = get_importance(model, prompt, mode)
    except ValueError as err:
        st.error(str(err))
    else:
        show(views.importance_heatmap(imp), key="interventions_importance")
        show(views.importance_vs_load(imp, layer), key="interventions_importance_load")
        csv_download("Importance (CSV)", imp.table, f"importance-{mode}", key="csv_importance")

# ----------------------------------------------------------------------------- agreement
st.subheader("Agreement between two routings of the prompt")
with st.form("agreement_form"):
    st.markdown(
        "Compare the sidebar's routing with another policy, or with a trace file of the same tokens (a JSON trace "
        "from this app, `moe-viz trace`, another checkpoint of this architecture, or an imported serving-engine trace)."
    )
    other_spec = st.text_input("Other policy", value="capacity:1.0", key="agreement_spec")
    upload = st.file_uploader("…or a trace file (JSON)", type=["json"], key="agreement_file")
    st.form_submit_button("Compare routings")
other: Trace | None = None
try:
    if upload is not None:
        if upload.size > MAX_UPLOAD_BYTES:
            raise ValueError(
                f"trace file must be at most {MAX_UPLOAD_BYTES // 2**20} MiB; got {upload.size / 2**20:.1f} MiB"
            )
        other = trace_io.from_json_text(upload.getvalue().decode("utf-8", errors="replace"))
    elif other_spec.strip():
        other = get_trace(model, prompt, parse_policy(other_spec))
except ValueError as err:
    st.error(f"Other routing: {err}")
if other is not None:
    try:
        ag = agreement.agreement(base, other)
    except ValueError as err:
        st.error(f"Cannot compare: {err}")
    else:
        show(views.agreement_by_layer(ag), key="interventions_agreement", heading=False)
        show(views.agreement_tokens(ag, base, other, layer), key="interventions_agreement_tokens")

st.divider()
downloads(intervened if intervened is not None else base, "interventions")
