"""Quantizing a Hugging Face GPT-2 with NVIDIA ModelOpt.

ModelOpt inserts quantizers into the model and calibrates them on sample text: it runs the model and records each
quantized tensor's largest magnitude (amax). weight_loader.py turns those into the scales the Tripy model uses.
"""

import os
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

import modelopt.torch.quantization as mtq
import torch
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from config import INT4_BLOCK_SIZE, check_quant_mode
from quant.kv_cache import described_with_kv_cache
from sources.hub import hub_reachable
from sources.tokenizer import gpt2_tokenizer

SHIPPED_CALIBRATION_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration.txt")
# The layers the deployed model quantizes, as ModelOpt names their quantizers. Embeddings, LayerNorms and the
# attention matmuls stay in high precision.
BLOCK_LINEARS = ("*attn.c_attn", "*attn.c_proj", "*mlp.c_fc", "*mlp.c_proj")
# Calibration algorithms a caller may pick instead of the mode's own (see quant_config).
CALIBRATION_ALGORITHMS = ("max",)


def modelopt_quantize(
    model_hf: torch.nn.Module,
    quant_mode: str,
    dataset_name: str | None = None,
    batch_size: int = 4,
    num_samples: int = 64,
    algorithm: str | None = None,
    kv_cache: str | None = None,
    lm_head_mode: str | None = None,
) -> torch.nn.Module:
    """Quantizes a Hugging Face GPT-2 in place with ModelOpt and returns it.

    Calibrates on `dataset_name` (see `create_forward_loop`); by default on CNN/DailyMail articles, or, when the
    Hugging Face Hub cannot be reached, on the English text shipped in data/calibration.txt. `algorithm` overrides
    the mode's calibration algorithm (see `quant_config`). `kv_cache` ("float8" or "int8") also quantizes the keys
    and values attention reads, calibrated with the weights (quant/kv_cache.py). `lm_head_mode` (one of
    LM_HEAD_MODES) also quantizes the output layer, untied from the input embedding first: calibration may rescale
    its weight in place.
    """
    config = quant_config(quant_mode, algorithm, lm_head_mode)
    if lm_head_mode is not None:
        from quant.lm_head import untie_lm_head

        untie_lm_head(model_hf)
    if kv_cache is not None:
        from quant.kv_cache import kv_cache_quant_cfg

        config["quant_cfg"] = config["quant_cfg"] + kv_cache_quant_cfg(kv_cache)
    dataset_name = default_dataset(dataset_name)
    device = next(model_hf.parameters()).device
    forward_loop = create_forward_loop(model_hf, dataset_name, gpt2_tokenizer(), device, batch_size, num_samples)

    start = time.perf_counter()
    mtq.quantize(model_hf, config, forward_loop)
    if config["algorithm"] == "smoothquant":
        unsmooth_after_gelu(model_hf)
    seconds = time.perf_counter() - start
    described = described_with_kv_cache(quant_mode, kv_cache)
    described += "" if lm_head_mode is None else f" with an {lm_head_mode} output layer"
    print(f"Calibrated {described} on {forward_loop.num_samples} samples in {seconds:.1f} s")
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

    dataset_name: "cnn_dailymail" or a local .txt/.json/.jsonl file (see `calibration_texts`). tokenizer: a
    transformers GPT-2 tokenizer. The loop's `num_samples` is how many it runs: fewer than asked when the data holds
    fewer.
    """
    texts = calibration_texts(dataset_name, num_samples)
    batches = calibration_batches(model, texts, tokenizer, device, batch_size, max_length)

    @torch.no_grad()
    def forward_loop(model: torch.nn.Module) -> None:
        for batch in tqdm(batches, desc="Calibrating", unit="batch"):
            model(batch["input_ids"], attention_mask=batch["attention_mask"])

    forward_loop.num_samples = sum(len(batch["input_ids"]) for batch in batches)  # what it runs, for the report
    return forward_loop


def quant_config(quant_mode: str, algorithm: str | None = None, lm_head_mode: str | None = None) -> dict:
    """ModelOpt's config for a mode: every quantizer off, then on for exactly the layers Tripy quantizes.

    algorithm: how to calibrate, instead of the mode's own ("max" for int8 and float8, AWQ for int4, SmoothQuant for
    int8-smoothquant); "max" for int4 takes each block's largest weight as its amax, without AWQ's search, and for
    int8-smoothquant is ModelOpt's INT8_DEFAULT_CFG recipe: the same W8A8 layers, unsmoothed. lm_head_mode: the
    output layer's weights in that format too, calibrated by the same algorithm.
    """
    if algorithm is not None and algorithm not in CALIBRATION_ALGORITHMS:
        raise ValueError(f"Unknown calibration algorithm {algorithm!r}; supported: {', '.join(CALIBRATION_ALGORITHMS)}")
    weight, inputs, default_algorithm = layer_format(quant_mode)
    layers = (*BLOCK_LINEARS, "lm_head") if quant_mode == "float8" else BLOCK_LINEARS
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for layer in layers:
        quant_cfg.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": weight})
        if inputs is not None:
            quant_cfg.append({"quantizer_name": f"{layer}.input_quantizer", "cfg": inputs})
    if lm_head_mode is not None:
        from quant.lm_head import check_lm_head_mode

        check_lm_head_mode(quant_mode, lm_head_mode, algorithm or default_algorithm)
        quant_cfg.append({"quantizer_name": "lm_head.weight_quantizer", "cfg": layer_format(lm_head_mode)[0]})
    return {"quant_cfg": quant_cfg, "algorithm": algorithm or default_algorithm}


def layer_format(quant_mode: str) -> tuple[dict, dict | None, str | dict]:
    """One quantized linear layer in a mode: its weight quantizer, input quantizer (None: off), and calibration."""
    check_quant_mode(quant_mode)
    fp8 = {"num_bits": (4, 3), "axis": None}  # E4M3, one scale per tensor
    if quant_mode == "int8-weight-only":
        return {"num_bits": 8, "axis": 0}, None, "max"
    if quant_mode == "int4-weight-only":
        # AWQ scales each input feature to protect the weights that meet large activations; the scale lives on the
        # (disabled) input quantizer as pre_quant_scale.
        weight = {"num_bits": 4, "block_sizes": {-1: INT4_BLOCK_SIZE, "type": "static"}}
        return weight, None, {"method": "awq_lite", "alpha_step": 0.1}
    if quant_mode == "int8-smoothquant":
        # ModelOpt's INT8_SMOOTHQUANT_CFG: int8 weights per output channel, int8 inputs per tensor (static, one scale
        # calibrated on the sample text). One scale for a whole activation fails where a few input features carry
        # outliers 10-100x the rest: the others round to a handful of levels. SmoothQuant divides each input feature
        # by a factor s and multiplies the weight's matching column by it, which leaves x @ W^T unchanged and moves
        # the outliers into the weights, quantized per output channel. ModelOpt (alpha 1) takes s as each feature's
        # calibrated amax: it multiplies the weight in place, keeps 1 / s as the input quantizer's pre_quant_scale
        # [in], and sets the input amax to the largest smoothed input. weight_loader.py reads all three.
        return {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}, "smoothquant"
    return fp8, fp8, "max"


def unsmooth_after_gelu(model_hf: torch.nn.Module) -> None:
    """Takes SmoothQuant's factor back out of each MLP c_proj: a factor of ones, on a W8A8 layer calibrated as "max".

    Runtimes without a place for a per-input factor (vLLM's int8 layout, exports/vllm_int8.py) fold it into the
    layer before: exactly into ln_1 and ln_2 ahead of c_attn and c_fc, into c_attn's value rows ahead of the
    attention's c_proj (attention mixes value rows with weights that sum to one), but not through the GELU ahead of
    the MLP's c_proj. Leaving that layer unsmoothed keeps one model that every runtime computes (docs/quality.md
    measures what it costs). ModelOpt's own functions undo it (the weight restored, its amax recalibrated, the input
    amax the largest unsmoothed input) and then apply a factor of ones, so that every W8A8 layer has one, as
    ModelOpt's W8A8_SQ_PER_CHANNEL export promises.
    """
    from modelopt.torch.quantization.model_calib import (
        apply_pre_quant_scale_and_smooth,
        disable_pre_quant_scale_and_resmooth,
    )

    for name, module in model_hf.named_modules():
        if name.endswith("mlp.c_proj") and module.input_quantizer.pre_quant_scale is not None:
            disable_pre_quant_scale_and_resmooth(module, delete_pre_quant_scale=True)
            ones = torch.ones(module.weight.shape[1], device=module.weight.device)  # weight [out, in]
            apply_pre_quant_scale_and_smooth(module, ones)


def calibration_texts(dataset_name: str, num_samples: int) -> list[str]:
    """Up to `num_samples` text samples: from "cnn_dailymail" (articles, from the Hugging Face Hub), or a local file:
    .txt (one sample per paragraph), .json or .jsonl (a "text" field per record). Says so when there are fewer."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    texts = _load_texts(dataset_name, num_samples)
    if len(texts) < num_samples:
        print(
            f"{dataset_name} has only {len(texts)} samples, fewer than the {num_samples} asked for: using {len(texts)}"
        )
    return texts


def calibration_batches(
    model: torch.nn.Module,
    texts: list[str],
    tokenizer: Any,
    device: torch.device | str,
    batch_size: int,
    max_length: int,
) -> list[dict[str, torch.Tensor]]:
    """`texts` as batches of input_ids, attention_mask and labels (padding: -100) [batch, seq], on `device`.

    tokenizer: a transformers GPT-2 tokenizer. Samples are truncated to `max_length` tokens, never beyond what the
    model's position embedding covers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_length = min(max_length, model.config.n_positions)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)  # no loss on padding
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "labels": labels}
        batches.append({name: tensor.to(device) for name, tensor in batch.items()})
    return batches


def default_dataset(dataset_name: str | None) -> str:
    """CNN/DailyMail when no dataset is named, or, when the Hugging Face Hub is unreachable, the shipped text."""
    if dataset_name is not None:
        return dataset_name
    if hub_reachable():
        return "cnn_dailymail"
    print("Hugging Face Hub unreachable: calibrating on the shipped data/calibration.txt instead of cnn_dailymail")
    return SHIPPED_CALIBRATION_TEXT


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
