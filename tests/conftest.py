"""pytest configuration: offline hub, one thread, and the fixtures tests share."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import Net, make_net

# Keep the hub client from retrying for half a minute when a test asks for a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: on a shared 2-core CI box, two threads slow the sweeps down several-fold.
torch.set_num_threads(1)


@pytest.fixture
def net() -> Net:
    return make_net()
