"""ResViz: see why residual networks work.

The router and frame of the app, and nothing else: page config, session state, navigation, the shared
sidebar, the error guard around the page and the URL that mirrors the configuration. Each page is a
``render`` function of a module in ``app_pages/``; everything they show is computed by ``resviz``.
Run with ``streamlit run app.py`` (``make run``), or ``resviz app`` once the package is installed.
"""

from __future__ import annotations

import streamlit as st
from streamlit.navigation.page import StreamlitPage

from app_pages import charts, design, experiments, inspection, jobs, state, tour, train

ABOUT = (
    "ResViz shows why residual networks work: design a block, watch it train next to its plain twin, "
    "then look inside. Everything on screen is computed live by the `resviz` library."
)


def pages() -> list[StreamlitPage]:
    """The navigation, in menu order. The URL paths are part of every shared link: keep them."""
    return [
        st.Page(tour.render, title="Why residual networks work", icon=":material/school:", url_path="", default=True),
        st.Page(design.render, title="Design", icon=":material/architecture:", url_path="design"),
        st.Page(train.render, title="Train", icon=":material/model_training:", url_path="train"),
        st.Page(inspection.render, title="Inspect", icon=":material/search:", url_path="inspect"),
        st.Page(experiments.render, title="Experiments", icon=":material/science:", url_path="experiments"),
    ]


def sidebar() -> None:
    """The frame shared by every page: device, running job, server load, about."""
    auto, _found = state.devices()
    with st.sidebar:
        st.caption(f"Device: **{auto}** (picked automatically)")
        jobs.sync_session()
        st.caption(jobs.server_load(), help="Training runs going on this server for all users; "
                   "Start is refused while every slot is taken.")
        st.caption(ABOUT)


def main() -> None:
    """One script run: the frame around the page the URL names."""
    st.set_page_config(page_title="ResViz", page_icon=":material/hub:", layout="wide")
    charts.use_theme()  # the ResViz chart template is Plotly's default in this process
    state.init_state()
    nav = pages()
    page = st.navigation(nav)
    if page.url_path == "" and state.has_design_link():  # a link shared before the tour: it opens Design
        st.switch_page(nav[1])
    sidebar()
    state.show_url_warning()
    with state.guard(f"The {page.title} page"):
        page.run()
    state.sync_url()


if __name__ == "__main__":  # streamlit runs this file as __main__; importing it (tests) runs nothing
    main()
