"""Every tokenize test starts from the same torch seed: random inputs must not make a test flaky."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_torch():
    torch.manual_seed(0)
