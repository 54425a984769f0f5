"""Suite-wide settings: tiny models run fastest on one intra-op thread on a shared 2-core machine."""

import os

import torch

os.environ.setdefault("RESVIZ_DATA", os.path.join(os.path.dirname(__file__), "_no_data_here"))
torch.set_num_threads(1)
