"""Load balance: every balance metric per layer, with its convention and baseline, and the charts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moe_viz import explain, figures, metrics

from app.ui import chart, downloads, traced_page

model, layer, trace = traced_page("Load balance", "balance")
lt = trace.layer(layer)
b = metrics.balance(lt)
E = b.num_experts

st.caption(
    f"Mode **{trace.policy}** on {trace.num_tokens} tokens. Layer {layer}: {b.assignments} assignments "
    f"(T × k' = {b.num_tokens} × {b.k}); fair share {b.fair_share:.2f} per expert."
)

st.subheader(f"Layer {layer} at a glance")
cards = [
    ("CV", f"{b.cv:.3f}", "Std / mean of the routed load per expert. Perfect balance: 0."),
    ("MaxVio", f"{b.max_vio:.3f}", "Busiest expert's load / mean − 1. Perfect balance: 0."),
    ("Load entropy (norm.)", f"{b.load_entropy_norm:.3f}", f"H(load shares) / log E. Perfect balance: 1 (H = log {E})."),
    ("Effective experts", f"{b.effective_experts:.2f} / {E}", f"exp(H); diversity exp(H)/E = {b.diversity:.3f}. Perfect balance: {E}."),
    ("Gini", f"{b.gini:.3f}", "Inequality of the load; 0 = equal, → 1 = one expert takes everything."),
    ("Dead experts", f"{b.dead_fraction:.0%}", "Share of experts no token was routed to. Baseline: 0%."),
    ("Max share", f"{b.max_share:.1%}", f"Busiest expert ({b.busiest_expert})'s share of assignments. Fair: {1 / E:.1%}."),
    ("Aux loss (HF)", f"{b.aux_loss_hf:.3f}", f"transformers' load_balancing_loss_func: E·Σ f·P with native k = {lt.top_k}; optimum {lt.top_k} (uniform routing)."),
    ("Aux loss (normalised)", f"{b.aux_loss_norm:.3f}", "HF aux loss / k (Switch/Megatron convention); optimum 1."),
    ("Router z-loss", f"{b.z_loss:.2f}", "mean over tokens of logsumexp(router logits)² (ST-MoE). Large = sharp logits."),
    ("Dropped", f"{b.dropped} ({b.drop_rate:.1%})", "Dropped assignments / assignments (capacity mode only)."),
    ("Fully dropped tokens", f"{b.fully_dropped_tokens}", f"Tokens that lost all {b.k} experts (residual only); partially dropped: {b.partially_dropped_tokens}."),
]
for row in range(0, len(cards), 6):
    cols = st.columns(6)
    for col, (label, value, help_text) in zip(cols, cards[row : row + 6]):
        col.metric(label, value, help=help_text)
st.caption(
    f"Perfect balance would read: CV 0 · MaxVio 0 · load entropy 1 · {E} effective experts · Gini 0 · no dead "
    f"experts · max share {1 / E:.1%} · HF aux loss {lt.top_k} (transformers' convention, optimum k) · normalised "
    "aux loss 1. Imbalance metrics use the routed load (kept + dropped); hover a number for its definition."
)

st.subheader("Expert load")
chart(figures.expert_load_bars(trace, layer), explain.explain_load(trace, layer), "balance_load_bars", f"Expert load, layer {layer}")
chart(figures.layer_load_heatmap(trace), explain.explain_capacity(trace), "balance_layer_load", "Layer × expert load")

st.subheader("All layers")
table = metrics.balance_table(trace)
shown = table.assign(layer=table["layer"].astype(str))  # "all" row: keep the column one type for Arrow
left, right = st.columns([3, 2])
with left:
    st.dataframe(shown, hide_index=True, width="stretch")
with right:
    st.markdown(explain.explain_balance_table(trace))
with st.expander("Conventions used in this table"):
    st.table(pd.DataFrame({"metric": list(table.attrs["conventions"]), "convention": list(table.attrs["conventions"].values())}))

st.subheader(f"Router confidence per token, layer {layer}")
entropy = metrics.router_entropy(lt)
margin = metrics.topk_margin(lt)
per_token = pd.DataFrame(
    {"router entropy (÷ log E)": entropy.numpy(), f"top-{lt.top_k} margin": margin.numpy()},
    index=pd.Index(range(trace.num_tokens), name="position"),
)
left, right = st.columns([3, 2], vertical_alignment="center")
with left:
    st.line_chart(per_token, height=260)
with right:
    low = int(margin.argmin())
    st.markdown(
        f"Mean normalised router entropy is **{float(entropy.mean()):.2f}** (1 = the router cannot decide, "
        f"0 = it is certain). The top-{lt.top_k} margin (last chosen minus first rejected probability) "
        f"averages **{float(margin.mean()):.3f}**; the most fragile decision is token {low} "
        f"{trace.tokens[low]!r}, margin **{float(margin[low]):.3f}**: a small nudge would swap its experts."
    )

st.subheader(f"Which experts work together, layer {layer}")
chart(figures.coactivation_heatmap(trace, layer), explain.explain_coactivation(trace, layer), "balance_coactivation", f"Co-activation, layer {layer}")

st.subheader(f"Do consecutive tokens reuse experts? Layer {layer}")
r = metrics.reuse(lt)
left, right = st.columns([3, 2], vertical_alignment="center")
with left:
    st.table(
        pd.DataFrame(
            {
                "observed": [f"{r.first_choice_same:.1%}", f"{r.sets_intersect:.1%}", f"{r.mean_overlap:.2f}"],
                "random routing": [f"{r.first_choice_baseline:.1%}", f"{r.intersect_baseline:.1%}", f"{r.overlap_baseline:.2f}"],
            },
            index=["same first choice", "sets share an expert", "mean overlap |S_t ∩ S_t+1|"],
        )
    )
with right:
    st.markdown(explain.explain_reuse(trace, layer))

downloads(trace, "load-balance")
