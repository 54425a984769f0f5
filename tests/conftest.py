"""Suite-wide settings: tiny models run fastest on one intra-op thread.

``make test`` runs the tests outside ``tests/e2e`` on one pytest-xdist worker per core with ``--dist loadfile``
(each file on one worker, so its module-level caches of trained nets serve all its tests), then the browser tests
alone, since they time pages.
"""

import torch

torch.set_num_threads(1)
