"""Suite-wide settings.

Tiny models run fastest on one intra-op thread; ``make test`` runs the tests outside ``tests/e2e`` on two pytest
workers (pytest-xdist), one per core of a 2-core machine, with each test file kept on one worker (its module-level
caches of trained nets serve all its tests), then the browser tests alone, since they time pages.
"""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # the groups `--dist loadgroup` keeps on one worker
        item.add_marker(pytest.mark.xdist_group(item.path.name))
