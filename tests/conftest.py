"""Suite-wide settings: tiny models run fastest on one intra-op thread on a shared 2-core machine."""

import torch

torch.set_num_threads(1)
