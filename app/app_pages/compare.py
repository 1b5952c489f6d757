"""Compare modes: two or three policies side by side on the same prompt, against native routing."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from app.resources import (
    config,
    get_capacity_sweep,
    get_generation,
    get_k_sweep,
    get_trace,
    has_analysis,
    has_generation,
)
from app.ui import csv_download, downloads, prompt_form, require_model, show, shows_errors, start_figures
from moe_viz import Policy, Trace, metrics, parse_policy, policy_spec, views
from moe_viz.policies import POLICY_SYNTAX
from moe_viz.sweeps import DEFAULT_FACTORS

POLICY_HELP = "Write " + POLICY_SYNTAX.replace("'", "`") + "."  # code spans: [..][..] would read as a link

st.title("Compare modes")
ctx = require_model()
model, layer = ctx.model, ctx.layer
assert model is not None and layer is not None
prompt = prompt_form("compare")
start_figures()

defaults = [f"top-k:{model.top_k}", "capacity:1.0", "ensemble:gate"]
with st.form("compare_policies"):
    st.markdown(f"Policies to compare with the model's own routing (leave the third empty for two). {POLICY_HELP}")
    cols = st.columns(3)
    specs = [cols[i].text_input(f"Policy {i + 1}", value=defaults[i], key=f"compare_policy_{i}") for i in range(3)]
    st.form_submit_button("Compare", type="primary")

with shows_errors():  # the prompt's own errors (empty, too long) once, before any policy
    native = get_trace(model, prompt, None)

policies: list[tuple[str, Policy | None]] = []
traces: list[Trace] = []
errors = []
for i, spec in enumerate(specs):
    if not spec.strip():
        continue
    try:
        policy = parse_policy(spec)
        trace = get_trace(model, prompt, policy)  # also checks k against the model
    except ValueError as err:
        errors.append(f"Policy {i + 1} ({spec!r}): {err}")
        continue
    policies.append((policy_spec(policy), policy))
    traces.append(trace)
for message in errors:
    st.error(message)
if not policies:
    st.warning("Enter at least one valid policy to compare.")
    st.stop()

st.subheader("Summary")
cols = st.columns(len(traces))
effects: list[metrics.ModeEffect | None] = []
effect_error = None
for col, trace in zip(cols, traces):
    try:
        effect = metrics.mode_effect(native, trace)
    except ValueError as err:
        effect, effect_error = None, str(err)
    effects.append(effect)
    with col:
        st.markdown(f"#### `{trace.policy}`")
        dropped = sum(item.dropped_count for item in trace.layers)
        st.metric("Dropped assignments (all layers)", dropped)
        st.metric(f"Dropped in layer {layer}", trace.layer(layer).dropped_count)
        if effect is not None:
            st.metric(
                "Top-1 flips vs native",
                f"{effect.flip_rate:.0%}",
                help="Positions whose most likely next token changed.",
            )
            st.metric("Mean KL(native ‖ mode)", f"{effect.mean_kl:.3g} nats")
            delta = effect.mean_delta_logprob
            st.metric("Δ log p(actual next token)", "n/a" if math.isnan(delta) else f"{delta:+.3f}")
if effect_error:
    st.warning(f"Prediction changes are not available: {effect_error}")

st.subheader(f"Routing differences from native, and the effect on the predictions, layer {layer}")
for i, trace in enumerate(traces):
    for view in views.compare_views(native, trace, layer):
        show(view, key=f"compare_{view.name}_{i}")
    if effects[i] is None:
        st.info(f"`{trace.policy}`: the effect on the predictions is not available for this run.")

st.subheader("Next token after the prompt")
cols = st.columns(len(traces) + 1)
for col, trace in zip(cols, [native, *traces]):
    with col:
        st.markdown(f"`{trace.policy}`")
        st.dataframe(
            pd.DataFrame(
                [(repr(token), prob) for token, prob in trace.predictions(-1, 5)], columns=["token", "probability"]
            ).style.format({"probability": "{:.1%}"}),
            hide_index=True,
            width="stretch",
        )

st.subheader("Generated text")
cfg = config()
with st.form("compare_generate"):
    new_tokens = st.slider("New tokens", 1, cfg.max_new_tokens, min(24, cfg.max_new_tokens), key="compare_new_tokens")
    generate_now = st.form_submit_button("Generate under each policy")
runs = [("native", None), *policies]
if generate_now or all(has_generation(model, prompt, p, new_tokens) for _, p in runs):
    cols = st.columns(len(runs))
    for col, (spec, policy) in zip(cols, runs):
        with col:
            st.markdown(f"`{spec}` (greedy)")
            bar = st.progress(0.0, text=f"Generating under {spec} …")
            with shows_errors():
                result = get_generation(
                    model,
                    prompt,
                    policy,
                    new_tokens,
                    progress=lambda done, total, bar=bar, spec=spec: bar.progress(
                        done / total, text=f"{spec}: {done}/{total} tokens"
                    ),
                )
            bar.progress(1.0, text=f"{len(result.new_token_ids)} new tokens")
            st.code(prompt + result.text, language=None, wrap_lines=True)
else:
    st.caption("Press **Generate** to decode greedily under native routing and each policy (the progress is shown).")

st.subheader("Sweeps: the whole curve instead of one setting")
st.caption(
    f"The capacity factor from {DEFAULT_FACTORS[0]:g} to {DEFAULT_FACTORS[-1]:g} (log-spaced, "
    f"{len(DEFAULT_FACTORS)} points) and k from 1 to {model.num_experts}, each sweep one batched forward of the prompt "
    "repeated once per setting."
    + (
        f" This server runs at most {cfg.max_analysis_tokens} token rows per analysis."
        if cfg.max_analysis_tokens
        else ""
    )
)
sweep_now = st.button("Run the sweeps", key="compare_sweeps")
if sweep_now or has_analysis("capacity_sweep", model, prompt, ()):
    try:
        with st.spinner("Sweeping the capacity factor and k …"):
            effects, drops = get_capacity_sweep(model, prompt)
            ks = get_k_sweep(model, prompt)
    except ValueError as err:
        st.error(str(err))
    else:
        show(views.capacity_sweep(effects, drops, native.next_token_loss()), key="compare_capacity_sweep")
        csv_download("Capacity sweep (CSV)", drops.merge(effects, on="factor"), "capacity-sweep", "csv_capacity_sweep")
        show(views.k_sweep(ks, model.top_k, native.next_token_loss()), key="compare_k_sweep")
        csv_download("k sweep (CSV)", ks, "k-sweep", "csv_k_sweep")

st.divider()
names = [trace.policy for trace in traces]
chosen = st.selectbox("Trace to download", names, key="compare_download_choice")
downloads(traces[names.index(chosen)], "compare")
