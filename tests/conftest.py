"""Shared fixtures for the adapter tests: toy models, randomised adapters and the PEFT twin.

The fixtures hand out plain functions (session scope), so hypothesis tests can use them too.
"""

import pytest
import torch
import toy_models


@pytest.fixture(scope="session")
def toy():
    """``toy(seed=0, d=8)``: a fresh :class:`toy_models.ToyLM` (attn.query/value/norm, mlp.fc,
    lm_head)."""

    def make(seed=0, d=8):
        torch.manual_seed(seed)
        return toy_models.ToyLM(d)

    return make


@pytest.fixture(scope="session")
def randomise():
    """``randomise(model, seed=1)``: training-like non-zero adapters, in place."""
    return toy_models.randomise


@pytest.fixture(scope="session")
def peft_twin():
    """``peft_twin(base, ours, **LoraConfig kwargs)``: PEFT's model holding our adapters'
    numbers."""
    return toy_models.peft_twin


def run_cli(capsys, *argv):
    """``python -m minigpt ARGV`` in this process: (exit code, stdout, stderr)."""
    from minigpt.__main__ import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
