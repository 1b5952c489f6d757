"""Explore: which experts every token went to, in every layer, under the sidebar's mode."""

from __future__ import annotations

import streamlit as st

from app.resources import Keys, display_name
from app.ui import downloads, show, traced_page
from moe_viz import views

model, layer, trace = traced_page("Explore routing", "explore")
lt = trace.layer(layer)

st.markdown(f"Routing: `{trace.policy}` on **{display_name(model.model_id)}** ({trace.device}, {trace.dtype})")
c = st.columns(5)
c[0].metric("Tokens", trace.num_tokens)
c[1].metric(
    f"Capacity C (layer {layer})",
    "—" if not lt.capacity else max(lt.capacity),
    help="Slots per expert in capacity mode: C = ceil(factor × T × k / E). '—' when no capacity applies.",
)
c[2].metric(f"Dropped (layer {layer})", lt.dropped_count, help="Assignments over an expert's capacity in this layer.")
c[3].metric("Dropped (all layers)", sum(item.dropped_count for item in trace.layers))
c[4].metric("Forward", f"{trace.timings_ms.get('forward_ms', float('nan')):.0f} ms")
st.caption(views.run_summary(trace))
if trace.held_native_layers:
    st.warning(
        f"Layers {', '.join(map(str, trace.held_native_layers))} keep their native routing: their routers cannot run "
        f"`{trace.policy}` (hash-routed, or maths moe-viz could not verify; `moe-viz inspect` says why per router)."
    )

heatmap, text, layer_load, paths = views.explore_views(trace, layer)
show(heatmap)
show(text)


@st.fragment
def token_close_up() -> None:
    """Picking a token reruns only this section, not the page."""
    st.subheader("One token up close")
    T = trace.num_tokens
    if st.session_state.get(Keys.POSITION) not in range(T):
        st.session_state[Keys.POSITION] = T - 1
    position = st.selectbox(
        "Token",
        list(range(T)),
        key=Keys.POSITION,
        format_func=lambda i: f"{i}: {trace.tokens[i]!r}",
    )
    for view in views.token_views(trace, layer, position):
        show(view, key=f"explore_{view.name}", heading=False)


token_close_up()
show(layer_load, key="explore_layer_load")
show(paths, key="explore_paths")

downloads(trace, "explore")
