"""Quantizing a Hugging Face GPT-2 with NVIDIA ModelOpt.

ModelOpt inserts quantizers into the model and calibrates them on sample text: it runs the model and records each
quantized tensor's largest magnitude (amax). weight_loader.py turns those into the scales the Tripy model uses.
"""

import os
import time
import warnings
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from config import INT4_BLOCK_SIZE, check_quant_mode
from hub import hub_reachable
from tokenizer import gpt2_tokenizer

with warnings.catch_warnings():
    # ModelOpt warns on import that it was not tested with this transformers version; this project's tests are.
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
    import modelopt.torch.quantization as mtq

SHIPPED_CALIBRATION_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration.txt")
# The layers the deployed model quantizes, as ModelOpt names their quantizers. Embeddings, LayerNorms and the
# attention matmuls stay in high precision.
BLOCK_LINEARS = ("*attn.c_attn", "*attn.c_proj", "*mlp.c_fc", "*mlp.c_proj")


def quant_config(quant_mode: str) -> dict:
    """ModelOpt's config for a mode: every quantizer off, then on for exactly the layers Tripy quantizes."""
    check_quant_mode(quant_mode)
    fp8 = {"num_bits": (4, 3), "axis": None}  # E4M3, one scale per tensor
    if quant_mode == "int8-weight-only":
        layers, weight, inputs, algorithm = BLOCK_LINEARS, {"num_bits": 8, "axis": 0}, None, "max"
    elif quant_mode == "int4-weight-only":
        weight = {"num_bits": 4, "block_sizes": {-1: INT4_BLOCK_SIZE, "type": "static"}}
        # AWQ scales each input feature to protect the weights that meet large activations; the scale lives on the
        # (disabled) input quantizer as pre_quant_scale.
        layers, inputs, algorithm = BLOCK_LINEARS, None, {"method": "awq_lite", "alpha_step": 0.1}
    else:  # float8
        layers, weight, inputs, algorithm = (*BLOCK_LINEARS, "lm_head"), fp8, fp8, "max"

    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        quant_cfg.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": weight})
        if inputs is not None:
            quant_cfg.append({"quantizer_name": f"{layer}.input_quantizer", "cfg": inputs})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


def modelopt_quantize(
    model_hf: torch.nn.Module,
    quant_mode: str,
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
) -> torch.nn.Module:
    """Quantizes a Hugging Face GPT-2 in place with ModelOpt and returns it.

    Calibrates on `dataset_name` (see `create_forward_loop`); by default on CNN/DailyMail articles, or, when the
    Hugging Face Hub cannot be reached, on the English text shipped in data/calibration.txt.
    """
    config = quant_config(quant_mode)
    if dataset_name is None:
        if hub_reachable():
            dataset_name = "cnn_dailymail"
        else:
            dataset_name = SHIPPED_CALIBRATION_TEXT
            print(
                "Hugging Face Hub unreachable: calibrating on the shipped data/calibration.txt instead of cnn_dailymail"
            )
    device = next(model_hf.parameters()).device
    forward_loop = create_forward_loop(model_hf, dataset_name, gpt2_tokenizer(), device, batch_size, num_samples)

    start = time.perf_counter()
    mtq.quantize(model_hf, config, forward_loop)
    seconds = time.perf_counter() - start
    print(f"Calibrated {quant_mode} on {forward_loop.num_samples} samples in {seconds:.1f} s")
    return model_hf


def create_forward_loop(
    model: torch.nn.Module,
    dataset_name: str,
    tokenizer: Any,
    device: torch.device | str,
    batch_size: int = 4,
    num_samples: int = 64,
    max_length: int = 512,
) -> Callable[[torch.nn.Module], None]:
    """A `forward_loop(model)` for `mtq.quantize`: runs `num_samples` text samples through the model.

    dataset_name: "cnn_dailymail" (articles, from the Hugging Face Hub), or a local file: .txt (one sample per
    paragraph), .json or .jsonl (a "text" field per record). tokenizer: a transformers GPT-2 tokenizer.
    Samples are truncated to `max_length` tokens, never beyond what the model's position embedding covers.
    The loop's `num_samples` is how many it runs: fewer than asked when the data holds fewer.
    """
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be at least 1, got {batch_size} and {num_samples}")
    texts = _load_texts(dataset_name, num_samples)
    if len(texts) < num_samples:
        print(
            f"{dataset_name} has only {len(texts)} samples, fewer than the {num_samples} asked for: using {len(texts)}"
        )
    max_length = min(max_length, model.config.n_positions)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]

    @torch.no_grad()
    def forward_loop(model: torch.nn.Module) -> None:
        for batch in tqdm(batches, desc="Calibrating", unit="batch"):
            tokens = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            model(tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))

    forward_loop.num_samples = len(texts)
    return forward_loop


def _load_texts(dataset_name: str, num_samples: int) -> list[str]:
    """Up to `num_samples` non-empty text samples from CNN/DailyMail or a local .txt/.json/.jsonl file."""
    if dataset_name == "cnn_dailymail":
        if not hub_reachable():
            raise OSError(
                "Cannot load cnn_dailymail: the Hugging Face Hub is unreachable. "
                f"Calibrate on a local .txt/.json/.jsonl file instead, such as {SHIPPED_CALIBRATION_TEXT}"
            )
        # Streaming reads just the samples needed instead of downloading the whole data set.
        stream = load_dataset("cnn_dailymail", "3.0.0", split="train", streaming=True)
        return [record["article"] for record in islice(stream, num_samples)]
    if not os.path.isfile(dataset_name):
        raise FileNotFoundError(
            f"Calibration data not found: {dataset_name} (expected 'cnn_dailymail' or a local file)"
        )
    extension = os.path.splitext(dataset_name)[1].lower()
    try:
        if extension == ".txt":
            dataset = load_dataset("text", data_files=dataset_name, sample_by="paragraph", split="train")
        elif extension in (".json", ".jsonl"):
            dataset = load_dataset("json", data_files=dataset_name, split="train")
        else:
            raise ValueError(f"Unsupported calibration file {dataset_name}: expected .txt, .json or .jsonl")
    except (DatasetGenerationError, StopIteration) as error:  # empty, binary, not UTF-8, malformed JSON
        cause = error.__cause__ or error
        raise ValueError(f"Cannot read {dataset_name} as {extension[1:]}: {type(cause).__name__}: {cause}") from None
    if "text" not in dataset.column_names:
        raise ValueError(f"{dataset_name} has no 'text' field (fields: {', '.join(dataset.column_names)})")
    texts = [text.strip() for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not texts:
        raise ValueError(f"{dataset_name} holds no text to calibrate on")
    return texts[:num_samples]
