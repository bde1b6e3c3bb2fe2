import os
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CALIBRATION_TEXT = os.path.join(REPO, "data", "calibration.txt")


def make_gpt2(
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 128,
    outlier_gain: float = 20.0,
    seed: int = 0,
):
    """A small random GPT-2 with the real vocabulary.

    n_embd >= 256 gives every int4 row at least two blocks of 128. Some LayerNorm gains are scaled up so a few
    input features carry outliers, as in trained LLMs: that is what AWQ's pre_quant_scale exists for.
    """
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions)
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for layer_norm in (block.ln_1, block.ln_2):
                outliers = torch.randperm(n_embd)[: n_embd // 16]
                layer_norm.weight[outliers] *= outlier_gain
    return model


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> str:
    """A directory holding a small GPT-2 checkpoint, saved the way Hugging Face saves gpt2."""
    path = tmp_path_factory.mktemp("gpt2-small-random")
    make_gpt2().save_pretrained(path)
    return str(path)
