"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest
from killing import Zygote


@pytest.fixture(scope="module")
def zygote():
    """Model stages start from one interpreter that has imported torch, transformers and TRL (see killing.py)."""
    z = Zygote("import torch, transformers, peft, datasets, trl\nfrom trl import DPOConfig, DPOTrainer\n"
               "import prefloop.cli, prefloop.loop, prefloop.gen.hf, prefloop.train.dpo")
    yield z
    z.close()
