"""moe-viz explorer: ``streamlit run app/streamlit_app.py``.

Page config, the shared sidebar (model, routing mode, layer) and ``st.navigation`` over the pages
in ``app/app_pages/``. All numbers come from ``moe_viz``; this app only shows them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(
    page_title="moe-viz: Mixture-of-Experts routing", page_icon=":material/compare_arrows:", layout="wide"
)

from app.first_paint import first_chart_first  # noqa: E402
from app.sidebar import render_sidebar  # noqa: E402

PAGES = Path(__file__).resolve().parent / "app_pages"

navigation = st.navigation(
    [
        st.Page(PAGES / "explore.py", title="Explore", icon=":material/search:", default=True),
        st.Page(PAGES / "load_balance.py", title="Load balance", icon=":material/balance:"),
        st.Page(PAGES / "compare.py", title="Compare modes", icon=":material/compare_arrows:"),
        st.Page(PAGES / "interventions.py", title="Interventions", icon=":material/science:"),
        st.Page(PAGES / "corpus.py", title="Corpus", icon=":material/library_books:"),
        st.Page(PAGES / "paper.py", title="Paper mode", icon=":material/article:"),
        st.Page(PAGES / "import_routing.py", title="Import", icon=":material/upload_file:"),
        st.Page(PAGES / "learn.py", title="Learn", icon=":material/school:"),
    ]
)
if not first_chart_first(navigation.url_path):  # a browser's first visit to Explore: the sidebar next run
    render_sidebar()
navigation.run()
