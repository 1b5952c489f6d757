"""Load balance: every balance metric per layer, with its convention and baseline, and the charts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.resources import config, current_prompt, get_generation, has_generation
from app.sidebar import page_context
from app.ui import csv_download, downloads, show, traced_page
from moe_viz import metrics, phases, views

model, layer, trace = traced_page("Load balance", "balance")
b = metrics.balance(trace.layer(layer))

st.caption(
    f"Mode **{trace.policy}** on {trace.num_tokens} tokens. Layer {layer}: {b.assignments} assignments "
    f"(T × k' = {b.num_tokens} × {b.k}); fair share {b.fair_share:.2f} per expert."
)

st.subheader(f"Layer {layer} at a glance")
cards = views.metric_cards(trace, layer)
for row in range(0, len(cards), 4):  # four a row: the longest labels ("Aux loss (normalised)") fit
    for col, card in zip(st.columns(4), cards[row : row + 4]):
        col.metric(card.label, card.value, help=card.help)
st.caption(
    "Imbalance metrics use the load each expert processed (dropped assignments are counted apart); hover a "
    "number for its definition and its value "
    "under perfectly even routing."
)

for view in views.balance_views(trace, layer):
    show(view, key=f"balance_{view.name}")
    if view.name == "balance_table":
        with st.expander("Conventions used in this table"):
            conventions = view.table.attrs["conventions"]
            st.table(pd.DataFrame({"metric": list(conventions), "convention": list(conventions.values())}))

st.subheader("Prefill against decode: the prompt's tokens and the generated ones")
cfg = config()
policy = page_context().policy
with st.form("balance_generate"):
    new_tokens = st.slider(
        "New tokens to generate (greedy, under the sidebar's mode)",
        2,
        max(2, cfg.max_new_tokens),
        min(24, max(2, cfg.max_new_tokens)),
        key="balance_new_tokens",
    )
    generate_now = st.form_submit_button("Generate and split the load")
prompt = current_prompt()
if generate_now or has_generation(model, prompt, policy, new_tokens):
    try:
        generation = get_generation(model, prompt, policy, new_tokens)
        phase_views = views.generation_views(generation.trace, layer)
    except ValueError as err:
        st.error(str(err))
    else:
        for view in phase_views:
            show(view, key=f"balance_phase_{view.name}")
        csv_download(
            "Prefill vs decode (CSV)", phases.phase_split(generation.trace).table, "prefill-decode", "csv_phases"
        )

downloads(trace, "load-balance")
