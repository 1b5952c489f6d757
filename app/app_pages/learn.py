"""Learn: from "what is a router" to "why capacity drops tokens", on the live model and your prompt."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.resources import Keys, get_capacity_sweep, get_trace, has_analysis
from app.ui import prompt_form, require_model, show, shows_errors, start_figures
from moe_viz import Capacity, Ensemble, TopK, metrics, views
from moe_viz.views import learn

st.title("Learn: how a Mixture-of-Experts layer routes tokens")
ctx = require_model()
model, layer = ctx.model, ctx.layer
assert model is not None and layer is not None
E, k = model.num_experts, model.top_k
st.markdown(
    f"This model has **{len(model.moe_layers)} MoE layers** with **{E} experts** each and sends every token to "
    f"**{k}** of them. Everything below is computed live on your prompt, in **layer {layer}** (change it in the "
    "sidebar). The sidebar's mode does not apply here: each step picks the routing it explains."
)
prompt = prompt_form("learn")
start_figures()

with shows_errors():
    native = get_trace(model, prompt, None)
lt = native.layer(layer)
T = native.num_tokens
if st.session_state.get(Keys.POSITION) not in range(T):
    st.session_state[Keys.POSITION] = T - 1
position = st.selectbox(
    "Token to follow", list(range(T)), key=Keys.POSITION, format_func=lambda i: f"{i}: {native.tokens[i]!r}"
)

st.header("1 · A router scores the experts")
st.markdown(learn.router_concept(lt))
show(views.router_distribution(native, layer, position), key="learn_router", heading=False)

st.header("2 · The output is a gate-weighted sum of experts")
chosen = lt.index[position].tolist()
weights = lt.weights[position].tolist()
terms = [f"{w:.3f} \\cdot E_{{{e}}}(x)" for e, w in zip(chosen, weights)]
if len(terms) > 4:  # a wide top-k: the first terms, then how many more (the sum would run off the page)
    terms = [*terms[:4], f"\\cdots\\ (+{len(terms) - 4}\\ \\text{{more}})"]
st.latex("y = " + " + ".join(terms))
st.markdown(learn.gate_sum_concept(native, layer, position))

CAPTURE_ONLY = (
    "This model's routers can only be recorded, not re-routed, so this step cannot be shown on it. "
    "Pick the default model in the sidebar to try it."
)


def section_top_k() -> None:
    ks = sorted({1, k, E})
    rows = []
    for kk in ks:
        with shows_errors():
            trace = get_trace(model, prompt, TopK(kk))
        try:
            effect = metrics.mode_effect(native, trace)
            flip, kl = f"{effect.flip_rate:.0%}", f"{effect.mean_kl:.3g}"
        except ValueError:
            flip, kl = "n/a", "n/a"
        rows.append(
            {
                "k (experts run per token)": kk,
                "share of expert compute": f"{kk / E:.0%}",
                "top-1 flips vs native": flip,
                "mean KL (nats)": kl,
            }
        )
    st.table(pd.DataFrame(rows).set_index("k (experts run per token)"))
    st.markdown(
        f"The model was trained with k = {k}. Fewer experts (k = 1) is cheaper but changes the predictions; running all "
        f"{E} costs {E / k:.0f}× the expert compute of k = {k}. The flips and KL above are measured on your prompt."
    )


st.header("3 · Sparse top-k: how many experts per token?")
if model.capture_only:
    st.info(CAPTURE_ONLY)
else:
    section_top_k()

st.header("4 · Load balancing: keep every expert busy")
show(views.expert_load(native, layer), key="learn_load", heading=False)
st.markdown(learn.balance_concept(lt))

st.header("5 · Why capacity drops tokens")
st.markdown(learn.CAPACITY_WHY)
if model.capture_only:
    st.info(CAPTURE_ONLY)
else:
    factor = st.slider(
        "Capacity factor", 0.25, 2.0, 1.0, step=0.25, key="learn_factor", help="C = ceil(factor × T × k / E)"
    )
    with shows_errors():
        capped = get_trace(model, prompt, Capacity(factor))
    show(views.expert_load(capped, layer), key="learn_capacity", heading=False)
    st.markdown(learn.capacity_concept(capped, layer))
    st.markdown("**The whole curve.** One setting shows one point; the sweep shows why factors above 1 exist.")
    if st.button("Sweep the capacity factor from 0.25 to 4", key="learn_sweep") or has_analysis(
        "capacity_sweep", model, prompt, ()
    ):
        try:
            with st.spinner("One batched forward, one copy of the prompt per factor …"):
                effects, drops = get_capacity_sweep(model, prompt)
        except ValueError as err:
            st.error(str(err))
        else:
            show(views.capacity_sweep(effects, drops, native.next_token_loss()), key="learn_sweep_view", heading=False)

st.header("6 · Ensemble: let every expert vote")
if model.capture_only:
    st.info(CAPTURE_ONLY)
else:
    with shows_errors():
        ensemble = get_trace(model, prompt, Ensemble("gate"))
    try:
        show(views.mode_effect(native, ensemble), key="learn_ensemble", heading=False)
    except ValueError as err:
        st.warning(str(err))
st.markdown(
    f"Running all {E} experts, each weighted by the router's own weight rule applied to all of them, is the dense "
    f"limit of the same layer: it costs "
    f"{E / k:.0f}× the expert compute, and the model was never trained that way, so it is not automatically better."
)
