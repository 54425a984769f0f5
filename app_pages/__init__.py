"""The pages of the ResViz app: each module's ``render()`` draws one page inside the frame of ``app.py``."""
