import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every test model is tiny: a second intra-op thread only adds overhead (and spins on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own temporary folder: a default output folder (runs/...) lands there, never
    in the working tree."""
    monkeypatch.chdir(tmp_path)
