import os

import pytest
import torch

# Two cores: under pytest-xdist each worker takes one thread, so workers don't fight over cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"
