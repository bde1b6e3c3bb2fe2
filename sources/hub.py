"""Where GPT-2 comes from: the Hugging Face Hub, a local checkpoint directory, or the model bundled with this example.

Only the standard library is imported up here, so that command lines can check a model name before the imports that
take seconds.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from cli import UsageError

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DEFAULT_MODEL = "gpt2"
# A small GPT-2 trained for this example by train.py, run when the default model cannot be downloaded.
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_MODEL_DIR = os.path.join(REPO_DIR, "bundled_model")
# Text the bundled model never saw in training: train.py writes it with the model, the quality report measures on it.
HELDOUT_PATH = Path(BUNDLED_MODEL_DIR).parent / "data" / "heldout.txt"
NEEDS = "config.json with model_type 'gpt2'"
GPT2_VOCAB_SIZE = 50257  # the ids GPT-2's tokenizer (sources/tokenizer.py) produces
# What transformers' GPT2Config takes when config.json leaves them out.
GPT2_WIDTH, GPT2_HEADS, GPT2_LAYERS = 768, 12, 12
# The config.json options that change GPT-2's arithmetic: (transformers' default, the values model.py computes).
GPT2_ARITHMETIC = {
    "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # both the tanh approximation
    "layer_norm_epsilon": (1e-5, (1e-5,)),
    "scale_attn_weights": (True, (True,)),
    "scale_attn_by_inverse_layer_idx": (False, (False,)),
}
HUB_CONTEXT_LENGTH = 1024  # n_positions of every GPT-2 on the Hub, and GPT2Config's default
# n_embd of each Hub model (its config.json): known before anything is downloaded.
HUB_WIDTHS = {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names for the dtypes a GPT-2 checkpoint's weights have
SIZES = ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")
# What transformers loads a checkpoint's weights from: one file, or shards listed in an index.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class HubUnreachableError(OSError):
    """A Hugging Face Hub model was asked for, it is not in the local cache, and the Hub cannot be reached."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers on its port; quick, so that being offline never hangs."""
    if hub_offline():
        return False
    return _hub_answers(timeout)


@functools.cache
def _hub_answers(timeout: float) -> bool:
    """The network probe, once per run: loading the model, choosing the calibration data and checking a flag all ask,
    and offline each probe can take `timeout` seconds."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for offline mode, read as huggingface_hub reads it:
    only these values mean offline, and anything else ("false", "no", a typo) leaves it online. Read otherwise, the
    two would disagree on which model and calibration data to use."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def check_checkpoint_dir(folder: str) -> None:
    """Raises ValueError, naming the file, unless `folder` looks like a loadable Hugging Face GPT-2 checkpoint.

    Reads config.json and the header of model.safetensors only, so a command line can check a folder at once.
    """
    config_path = os.path.join(folder, "config.json")
    try:
        os.listdir(folder)
    except OSError as error:  # a folder its user may not open reads as one without config.json
        raise ValueError(f"cannot read {folder}: {error.strerror}") from None
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder!r} is not a Hugging Face GPT-2 checkpoint (needs {NEEDS})")
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}): is the checkpoint complete?") from None
    except OSError as error:  # no permission to read it
        raise ValueError(f"cannot read {config_path}: {error.strerror}") from None
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        raise ValueError(f"{folder!r} is not a Hugging Face GPT-2 checkpoint (needs {NEEDS})")
    check_config(config, config_path)
    # An export holds quantized weights, which a plain GPT2LMHeadModel would load as noise: refused by name.
    if os.path.isfile(os.path.join(folder, "hf_quant_config.json")) or "quantization_config" in config:
        raise ValueError(
            f"{folder!r} is a quantized checkpoint (as written by --export-dir): example.py runs it with "
            "--model-type; here, pass the unquantized model it was exported from"
        )
    weights_path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights_path):
        check_safetensors(weights_path)
    elif not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{folder!r} has config.json but no weights: expected {' or '.join(WEIGHT_FILES)}")


def check_config(config: dict, config_path: str) -> None:
    """A GPT-2 config.json that this example's models can be built from, checked before anything is allocated:
    its sizes are whole numbers of at least 1 (a zero would surface as a division by zero deep in transformers),
    the width splits evenly into the heads, the weights fit in memory, and it asks for GPT-2's own arithmetic, the
    only one model.py and its twin compute."""
    for name in SIZES:
        value = config.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{config_path}: {name} must be a whole number of at least 1, got {value!r}")
    n_embd, n_head = config.get("n_embd", GPT2_WIDTH), config.get("n_head", GPT2_HEADS)
    if n_embd % n_head:
        raise ValueError(f"{config_path}: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    n_layer = config.get("n_layer", GPT2_LAYERS)
    embeddings = config.get("vocab_size", GPT2_VOCAB_SIZE) + config.get("n_positions", HUB_CONTEXT_LENGTH)
    weight_bytes = 4 * (12 * n_layer * n_embd**2 + embeddings * n_embd)  # float32: 12 n_embd^2 per block
    memory = machine_memory()
    if weight_bytes > memory:
        raise ValueError(
            f"{config_path}: a GPT-2 of these sizes needs {weight_bytes / 1e9:,.0f} GB for its weights, more than this "
            f"machine's {memory / 1e9:.0f} GB of memory"
        )
    for name, (default, accepted) in GPT2_ARITHMETIC.items():
        if config.get(name, default) not in accepted:
            raise ValueError(
                f"{config_path}: {name} is {config[name]!r}; model.py and its twin compute GPT-2's "
                f"{' or '.join(map(repr, accepted))}"
            )


def machine_memory() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def context_length(model_type: str) -> int:
    """The n_positions of a Hub model or of a checkpoint folder that `check_checkpoint_dir` accepted."""
    if model_type in HUB_MODELS:
        return HUB_CONTEXT_LENGTH
    with open(os.path.join(model_type, "config.json"), encoding="utf-8") as file:
        return json.load(file).get("n_positions", HUB_CONTEXT_LENGTH)


def model_width(model_type: str) -> int:
    """The n_embd of a Hub model or of a checkpoint folder that `check_checkpoint_dir` accepted."""
    if model_type in HUB_MODELS:
        return HUB_WIDTHS[model_type]
    with open(os.path.join(model_type, "config.json"), encoding="utf-8") as file:
        return json.load(file).get("n_embd", GPT2_WIDTH)


def check_safetensors(path: str) -> None:
    """Raises ValueError if a .safetensors file is cut short or its header is not what the format prescribes.

    The format: 8 bytes (little-endian header length N), N bytes of JSON naming each tensor's byte range
    ("data_offsets", counted from the end of the header), then the tensor data.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or 8 + header_length > size:
                raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes): copy it again")
            header_bytes = file.read(header_length)
    except OSError as error:  # no permission to read it
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    try:
        header = json.loads(header_bytes)
        tensors = [tensor for name, tensor in header.items() if name != "__metadata__"]
        data_end = max((tensor["data_offsets"][1] for tensor in tensors), default=0)
        dtypes = {tensor["dtype"] for tensor in tensors}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise ValueError(f"{path} has a corrupted header: copy it again") from None
    if not dtypes <= FLOAT_DTYPES:  # transformers would cast integers to float without a word
        raise ValueError(f"{path} holds {', '.join(sorted(dtypes - FLOAT_DTYPES))} tensors: expected float weights")
    if 8 + header_length + data_end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, its header describes {8 + header_length + data_end}")


def load_hf_model(model_type: str) -> GPT2LMHeadModel:
    """GPT-2 from the Hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from a local checkpoint directory, in float32."""
    import torch
    from transformers import GPT2LMHeadModel

    if os.path.isdir(model_type):
        return _load_checkpoint_dir(model_type)
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


def _load_checkpoint_dir(folder: str) -> GPT2LMHeadModel:
    """A local checkpoint, strictly: any weight the checkpoint lacks or holds in another shape is an error, where
    transformers would start it from random numbers and only log a report."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    check_checkpoint_dir(folder)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report: its findings are raised below, in one line
    try:
        model, info = GPT2LMHeadModel.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as error:  # a damaged pytorch_model.bin alone fails in half a dozen types (pickle's, zip's, ...)
        message = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"cannot load the checkpoint in {folder!r}: {message}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    wrong = [*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])]
    if wrong:
        raise ValueError(
            f"the weights in {folder!r} do not match its config.json: {len(wrong)} missing or of another shape, "
            f"such as {sorted(wrong)[0]}"
        )
    broken = next((name for name, weight in model.named_parameters() if not torch.isfinite(weight).all()), None)
    if broken is not None:
        raise ValueError(f"the weights in {folder!r} hold inf or NaN (in {broken}): copy the checkpoint again")
    if model.config.vocab_size < GPT2_VOCAB_SIZE:  # token ids from GPT-2's tokenizer would index past its embedding
        raise ValueError(
            f"{folder!r} has a vocabulary of {model.config.vocab_size} tokens: this example encodes text with GPT-2's "
            f"tokenizer, which needs at least {GPT2_VOCAB_SIZE}"
        )
    return model.eval()


def load_hf_model_or_bundled(model_type: str | None) -> tuple[str, GPT2LMHeadModel]:
    """example.py's --model-type: (the name or directory loaded, the Hugging Face GPT-2), the bundled model when the
    default is unreachable; what cannot be loaded is a UsageError."""
    try:
        return model_type or DEFAULT_MODEL, load_hf_model(model_type or DEFAULT_MODEL)
    except HubUnreachableError as error:
        # Only the default falls back: a model the user named is what they want to run, not a stand-in for it.
        if model_type is not None:
            raise UsageError(str(error)) from None
    except (ValueError, OSError) as error:  # not a GPT-2 name or checkpoint, or an unreadable one
        raise UsageError(str(error)) from None

    if not os.path.isfile(os.path.join(BUNDLED_MODEL_DIR, "config.json")):
        raise UsageError(
            f"cannot download {DEFAULT_MODEL} (the Hugging Face Hub is unreachable) and {BUNDLED_MODEL_DIR} is missing"
        )
    print(
        f"Could not download {DEFAULT_MODEL} (the Hugging Face Hub is unreachable and it is not in the local cache): "
        f"running the bundled model in {os.path.relpath(BUNDLED_MODEL_DIR)}/ instead"
    )
    try:
        return os.path.relpath(BUNDLED_MODEL_DIR), load_hf_model(BUNDLED_MODEL_DIR)
    except (ValueError, OSError) as error:  # a damaged copy of the repository
        raise UsageError(f"the bundled model cannot be loaded: {error}") from None
