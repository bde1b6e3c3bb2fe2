"""Where GPT-2 comes from: the Hugging Face Hub, a local checkpoint directory, or the model bundled with this example.

Only the standard library is imported up here, so that command lines can check a model name before the imports that
take seconds.
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DEFAULT_MODEL = "gpt2"
# A small GPT-2 trained for this example by train.py, run when the default model cannot be downloaded.
BUNDLED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled_model")


class HubUnreachableError(OSError):
    """A Hugging Face Hub model was asked for, it is not in the local cache, and the Hub cannot be reached."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers on its port; quick, so that being offline never hangs."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hf_model(model_type: str) -> GPT2LMHeadModel:
    """GPT-2 from the Hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a local checkpoint directory, in float32."""
    import torch
    from transformers import GPT2LMHeadModel

    if os.path.isdir(model_type):
        config_path = os.path.join(model_type, "config.json")
        model_kind = json.load(open(config_path)).get("model_type") if os.path.isfile(config_path) else None
        if model_kind != "gpt2":
            raise ValueError(
                f"{model_type!r} is not a Hugging Face GPT-2 checkpoint (needs config.json with model_type 'gpt2')"
            )
        return GPT2LMHeadModel.from_pretrained(model_type, dtype=torch.float32).eval()
    if model_type not in HUB_MODELS:
        raise ValueError(
            f"Unknown model type {model_type!r}: expected one of {', '.join(HUB_MODELS)} "
            "or a local GPT-2 checkpoint directory"
        )
    try:  # the local cache first: it needs no network
        return GPT2LMHeadModel.from_pretrained(model_type, dtype=torch.float32, local_files_only=True).eval()
    except OSError:
        if not hub_reachable():
            raise HubUnreachableError(
                f"Cannot download {model_type}: the Hugging Face Hub is unreachable and it is not in the local cache. "
                "Pass a local GPT-2 checkpoint directory instead."
            ) from None
    return GPT2LMHeadModel.from_pretrained(model_type, dtype=torch.float32).eval()
