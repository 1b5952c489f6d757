"""Load balance: every balance metric per layer, with its convention and baseline, and the charts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.ui import downloads, show, traced_page
from moe_viz import metrics, views

model, layer, trace = traced_page("Load balance", "balance")
b = metrics.balance(trace.layer(layer))

st.caption(
    f"Mode **{trace.policy}** on {trace.num_tokens} tokens. Layer {layer}: {b.assignments} assignments "
    f"(T × k' = {b.num_tokens} × {b.k}); fair share {b.fair_share:.2f} per expert."
)

st.subheader(f"Layer {layer} at a glance")
cards = views.metric_cards(trace, layer)
for row in range(0, len(cards), 6):
    for col, card in zip(st.columns(6), cards[row : row + 6]):
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

downloads(trace, "load-balance")
