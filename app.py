"""ResViz: see why residual networks work.

The router and frame of the app: page config, navigation, the shared sidebar, and the URL that
mirrors the configuration. Pages live in ``app_pages/``; everything they show is computed by ``resviz``.
Run with ``streamlit run app.py``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit.navigation.page import StreamlitPage

from app_pages import common

ROOT = Path(__file__).parent
# (script, title, icon). A page whose file is absent is left out of the navigation, which keeps the
# app usable while a page is being written and leaves a slot for the Experiments page.
PAGES = (
    ("app_pages/design.py", "Design", ":material/architecture:"),
    ("app_pages/train.py", "Train", ":material/model_training:"),
    ("app_pages/inspection.py", "Inspect", ":material/search:"),
    ("app_pages/experiments.py", "Experiments", ":material/science:"),
)


def navigation() -> StreamlitPage:
    pages = [
        st.Page(path, title=title, icon=icon, default=i == 0, url_path=None if i == 0 else title.lower())
        for i, (path, title, icon) in enumerate(PAGES)
        if (ROOT / path).is_file()
    ]
    return st.navigation(pages)


st.set_page_config(page_title="ResViz", page_icon=":material/hub:", layout="wide")
common.init_state()
page = navigation()
common.sidebar()
common.show_url_warning()
with common.guard(f"The {page.title} page"):
    page.run()
common.sync_url()
