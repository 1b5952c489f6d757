"""A browser's first visit to Explore: the first chart first, the rest of the page once it is drawn.

Streamlit sends a page's elements as the script makes them, and the browser renders all that has
arrived before it draws the heatmap: the sidebar's widgets, the prompt form, the metrics. On the
2-core bench machine that work put Explore's first chart at 1.4x a bare Streamlit + plotly page
(``bench/first_paint.py``), whatever the order of the elements in the script.

So a session's first run of Explore, in a browser, sends the title and the heatmap only, in the
places the full page gives them (empty blocks of about their height stand where the prompt form and
the run summary go), and a beacon: a few lines of JavaScript that tell the server once the browser has drawn a
chart. That triggers the next run, which sends the whole page; the heatmap keeps its place and is
not drawn again. The sidebar's decisions on that first run come from ``sidebar.quiet_context``,
the same rules the sidebar applies, without its widgets.

``MOE_VIZ_FIRST_PAINT`` sets when this applies: ``auto`` (default) for browsers only (a client
that sends a ``Mozilla/`` user agent runs the beacon; scripts, tests and AppTest get the whole page
at once), ``always``, or ``never``. A link with settings in its URL, a model not loaded yet, a
first run that fails (its message comes with the whole page) and any page other than Explore
always get the whole page at once.
"""

from __future__ import annotations

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app.resources import config

PAINTED = "_first_chart_drawn"  # session: the whole page has been sent once; never stage again
STAGED_RUN = "_first_chart_only"  # this run sends the first chart only
FALLBACK_S = 5.0  # the whole page comes this long after the first chart at the latest

# The beacon: as soon as a plotly chart in the page has laid out its SVG (or after a few seconds,
# whatever happens), set the trigger that asks the server for the whole page.
BEACON_JS = """
export default function ({ setTriggerValue }) {
  let done = false;
  const fire = () => {
    if (!done) {
      done = true;
      clearInterval(poll);
      setTriggerValue("drawn", true);
    }
  };
  const drawn = () =>
    [...document.querySelectorAll(".js-plotly-plot")].some((el) => el._fullLayout && el.querySelector(".main-svg"));
  const poll = setInterval(() => drawn() && fire(), 40);
  const fallback = setTimeout(fire, FALLBACK_MS);
  return () => {
    done = true;
    clearInterval(poll);
    clearTimeout(fallback);
  };
}
""".replace("FALLBACK_MS", str(int(FALLBACK_S * 1000)))

_beacon = st.components.v2.component("moe_viz_first_chart_drawn", js=BEACON_JS)


def _mark_painted() -> None:
    st.session_state[PAINTED] = True


def _from_browser() -> bool:
    return st.context.headers.get("User-Agent", "").startswith("Mozilla/")


def first_chart_first(page_path: str) -> bool:
    """Decide, at the start of a run, whether it sends Explore's first chart only (and record it
    for ``staged``). ``page_path`` is the page's URL path ("" for the default page)."""
    mode = config().first_paint
    wanted = (
        mode != "never"
        and not st.session_state.get(PAINTED)
        and page_path in ("", "explore")
        and not st.query_params  # a shared link: its settings go through the sidebar's messages
        and (mode == "always" or _from_browser())
    )
    if wanted:
        from app.sidebar import quiet_context  # the sidebar imports this module's callers

        wanted = quiet_context() is not None
    st.session_state[STAGED_RUN] = wanted
    if not wanted:
        _mark_painted()
    return wanted


def block(name: str, reserve_px: int) -> DeltaGenerator:
    """A container for what the first chart's run leaves out, at least ``reserve_px`` high (about
    what it holds): empty on that run, it keeps the chart below in place, and on the next run it
    keeps it there while the browser is still loading the scripts of the widgets it holds (drawn
    before they load, they take less room: the chart would rise by about 100 px for half a second
    and come back down).

    Streamlit has no minimum height for a container, so the container is keyed and its first
    element, a markdown ``<style>``, gives its class one and hides itself. Markdown, not a
    style-only ``st.html``: the browser draws markdown at once, while ``st.html`` waits for a
    script of its own that arrives after the chart. ``name`` keys the block; ``reserve_px`` is a
    measured height, not a user's value."""
    key = f"first_paint_{name}"
    container = st.container(key=key)
    style = (
        f".st-key-{key} {{ min-height: {int(reserve_px)}px; }} "
        f".st-key-{key} > :first-child {{ display: none; }}"  # this style's own element: no room, no gap
    )
    container.markdown(f"<style>{style}</style>", unsafe_allow_html=True)
    return container


def staged() -> bool:
    """This run sends the first chart only."""
    return bool(st.session_state.get(STAGED_RUN))


def whole_page_now() -> None:
    """Give up the staged run (an error to show, say) and run the whole page instead."""
    _mark_painted()  # the rerun's first_chart_first then decides on the whole page
    st.rerun()


def finish_first_chart() -> None:
    """After the first chart: the beacon, a server-side fallback, and the end of this run."""
    _beacon(key="first_chart_drawn", on_drawn_change=_mark_painted, height=0)

    @st.fragment(run_every=FALLBACK_S)
    def fallback() -> None:
        # The first call is this run's; the next comes from the browser's timer, if the beacon
        # never answered (its script blocked, say): then the whole page comes anyway.
        if st.session_state.get("_first_chart_fallback_armed"):
            _mark_painted()
            st.rerun(scope="app")
        st.session_state["_first_chart_fallback_armed"] = True

    fallback()
    st.stop()
