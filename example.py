"""Generates text with GPT-2, optionally quantized by NVIDIA ModelOpt, on Tripy (TensorRT) or its PyTorch twin.

    python example.py --quant-mode int4-weight-only
    python example.py --quant-mode auto --effective-bits 6    # a per-layer mix searched by ModelOpt's AutoQuantize

The steps, top to bottom in `main`:
1. load GPT-2 from Hugging Face (or the bundled model when the Hub is unreachable),
2. quantize and calibrate it with ModelOpt (with --quant-mode; with auto, each layer in the format AutoQuantize
   chose for it, printed as a table and saved as a recipe that --recipe reuses),
3. load its weights and scales into the Tripy GPT (model.py) and compile it with TensorRT, or, without a GPU or
   without nvtripy, into the PyTorch twin (reference.py), which runs the same math on the CPU,
4. sample new tokens, printing each as soon as it exists.

Only the standard library is imported up here: torch, transformers and ModelOpt take seconds to import, and a
mistake on the command line should be reported at once (cli/example_args.py). Each step imports what it needs; a
feature is imported where its flag asks for it (quant/auto_quantize.py, quant/save_restore.py, exports/checkpoint.py,
exports/checkpoint_loader.py); quant/kv_cache.py and quant/lm_head.py import torch only where they use it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cli import UsageError, run
from cli.example_args import check_float8_gpu, check_model_fits, choose_backend, is_export, parse_args, recipe_out_path
from config import AUTO_QUANT_MODE, GPTConfig, config_from_hf_config
from quant.kv_cache import kv_cache_in
from quant.lm_head import lm_head_in

if TYPE_CHECKING:
    import tiktoken
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

SEPARATOR = "-" * 80
# generate(idx [1, prompt], max_new_tokens, temperature, top_k, generator, on_token) -> [1, prompt + new tokens]
Generate = Callable[..., "torch.Tensor"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend, backend_reason = choose_backend(args.backend, args.model_type)
    if backend == "tripy" and "float8" in (args.quant_mode, args.kv_cache):
        check_float8_gpu()
    print(f"Backend: {backend} ({backend_reason})")

    # The arguments are good: now the imports that take seconds.
    import transformers

    from sources.tokenizer import gpt2_encoding

    transformers.logging.disable_progress_bar()  # loading a checkpoint takes a moment; its progress bar is noise
    encoding = gpt2_encoding()
    # "<|endoftext|>" in a prompt is GPT-2's document separator, not literal text.
    prompt_tokens = encoding.encode(args.input_text, allowed_special="all")
    if backend == "onnxruntime":  # a folder --export-onnx wrote: no calibration, no weights to load (docs/onnx.md)
        from exports.onnx_runtime import example_generator

        generate_and_print(example_generator(args.model_type, len(prompt_tokens), args), encoding, prompt_tokens, args)
        return

    model_type, hf_model, hf_config, quant_mode = load_model(args, len(prompt_tokens))
    device = "cuda" if backend == "tripy" else "cpu"  # calibrate on the GPU when Tripy has one
    layer_quant_modes = None
    if args.load_quantized is not None:
        from quant.save_restore import restore_step

        hf_model, quant_mode, layer_quant_modes = restore_step(hf_model, args.load_quantized, quant_mode)
    elif args.quant_mode == AUTO_QUANT_MODE:
        from quant.auto_quantize import auto_quantize_step

        layer_quant_modes = auto_quantize_step(hf_model, args, recipe_out_path(args), device)
    elif args.quant_mode is not None and hf_model is not None:
        quantize(hf_model, quant_mode, args, device)
    if args.save_quantized is not None:
        from quant.save_restore import save_step

        save_step(hf_model, args.save_quantized)
    if args.verbose:
        import modelopt.torch.quantization as mtq

        mtq.print_quant_summary(hf_model)  # every quantizer: on or off, bits, axis or blocks, amax
    if args.export_dir is not None:
        from exports.checkpoint import export_step

        export_step(hf_model, args.export_dir, args.overwrite)
    if args.export_onnx is not None:
        from exports.onnx_export import export_step as export_onnx_step
        from exports.onnx_fused import WRITERS  # the standard file, or ONNX Runtime's own fused operators

        write = WRITERS[args.onnx_flavor or "standard"]
        export_onnx_step(model_type, hf_model, quant_mode, layer_quant_modes, args.export_onnx, args.overwrite, write)
    if args.export_only:
        return

    dtype = args.dtype or ("float16" if backend == "tripy" else "float32")
    # The Tripy model's (and the twin's) config: the checkpoint's shape, its modes, and the sequence to generate.
    kv_cache = kv_cache_in(model_type, hf_model)  # --kv-cache's, or restored or exported with one
    lm_head_mode = lm_head_in(model_type, hf_model)  # --lm-head's, or restored or exported with one
    shape = {"seq_len": len(prompt_tokens) + args.max_new_tokens, "batch_size": 1, "dtype": dtype}
    modes = {
        "quant_mode": quant_mode,
        "layer_quant_modes": layer_quant_modes,
        "kv_cache": kv_cache,
        "lm_head_mode": lm_head_mode,
    }
    config = config_from_hf_config(hf_config, **modes, **shape)
    if backend == "tripy" and "float8" in {quant_mode, kv_cache, *(layer_quant_modes or {}).values()}:
        check_float8_gpu()  # again: an export, a saved model or AutoQuantize's search has said what runs
    if backend in ("tripy", "tripy-cpu"):
        generate = build_tripy_generator(config, model_type, hf_model, backend)
    else:
        generate = build_torch_generator(config, model_type, hf_model)
    generate_and_print(generate, encoding, prompt_tokens, args)


def load_model(args: argparse.Namespace, prompt_len: int) -> tuple[str, GPT2LMHeadModel | None, GPT2Config, str | None]:
    """(the name or folder loaded, the Hugging Face GPT-2 or None for an export, its config, the quantization mode),
    after checking that the prompt and the new tokens fit the model and that int4's blocks fit its width."""
    start = time.perf_counter()
    if is_export(args.model_type):  # calibrated already: its weights and scales go straight into the model
        model_type, hf_model = args.model_type, None
        from exports.checkpoint_loader import read_checked_export

        hf_config, quant_mode = read_checked_export(args.model_type)
        print(f"Model: {model_type} (a ModelOpt export, {quant_mode}: no calibration)")
    else:
        from sources.hub import load_hf_model_or_bundled

        model_type, hf_model = load_hf_model_or_bundled(args.model_type)
        hf_config, quant_mode = hf_model.config, args.quant_mode
        num_params = sum(p.numel() for p in hf_model.parameters())
        print(
            f"Model: {model_type} ({num_params / 1e6:.1f}M parameters), loaded in {time.perf_counter() - start:.1f} s"
        )
    if not args.export_only:
        check_model_fits(args, model_type, hf_config, quant_mode, prompt_len)
    return model_type, hf_model, hf_config, quant_mode


def quantize(hf_model: GPT2LMHeadModel, quant_mode: str, args: argparse.Namespace, device: str) -> None:
    """Quantizes and calibrates `hf_model` in place with ModelOpt (quantization.py prints the calibration time).

    Calibration runs the model on every sample (AWQ many times over), so it runs on `device`, the GPU when Tripy has
    one; the model then goes back to the CPU, where the weight loader reads it and Tripy wants its scales."""
    import datasets

    from quantization import modelopt_quantize

    datasets.disable_progress_bars()  # reading a few kilobytes of text; quantization.py shows calibration progress
    hf_model.to(device)
    try:
        samples = args.num_calibration_samples  # with --kv-cache, the keys and values are calibrated with the weights
        extras = {"kv_cache": args.kv_cache, "lm_head_mode": args.lm_head}  # and with --lm-head, the output layer
        modelopt_quantize(hf_model, quant_mode, args.calibration_data, num_samples=samples, **extras)
    except (OSError, ValueError) as error:  # calibration data that cannot be read
        raise UsageError(str(error)) from None
    hf_model.to("cpu")


def build_tripy_generator(config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel, backend: str) -> Generate:
    """Loads the weights into the Tripy GPT and compiles it; returns generate(idx, max_new_tokens, ...).

    On tripy-cpu, tripy_cpu runs what TensorRT would; on tripy, only its faster stack recording (docs/tripy.md).
    """
    import tripy_cpu

    if backend == "tripy-cpu":
        tripy_cpu.use()  # the CPU executor, which also installs fast_stack_info
    else:
        tripy_cpu.fast_stack_info()
    import nvtripy as tp

    import model

    start = time.perf_counter()
    tripy_gpt = model.GPT(config)
    load_weights(tripy_gpt, config, model_type, hf_model, getattr(tp, config.dtype))
    print(f"Loaded the weights into the Tripy GPT in {time.perf_counter() - start:.1f} s")
    compiler = "TensorRT" if backend == "tripy" else "the CPU executor (no TensorRT)"
    print(f"Tracing and compiling with {compiler}, twice (prompt and one-token steps); this takes a while", flush=True)
    start = time.perf_counter()
    compiled = model.compile_model(tripy_gpt, config)
    print(f"Compiled with {compiler} in {time.perf_counter() - start:.1f} s")

    def generate(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return model.generate(compiled, idx, max_new_tokens, temperature, top_k, generator, on_token)

    return generate


def build_torch_generator(config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel) -> Generate:
    """Loads the weights into the PyTorch twin; returns generate(idx, max_new_tokens, temperature, top_k, ...)."""
    import torch

    import reference

    start = time.perf_counter()
    twin = reference.GPT(config).eval()
    load_weights(twin, config, model_type, hf_model, getattr(torch, config.dtype))
    print(f"Loaded the weights into the PyTorch twin in {time.perf_counter() - start:.1f} s")

    def generate(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return reference.generate(twin, idx, max_new_tokens, temperature, top_k, generator, True, on_token)

    return generate


def load_weights(
    backend_model: object, config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel | None, dtype: object
) -> None:
    """Copies the (quantized) Hugging Face model's weights and scales, or an export's, into the backend's GPT."""
    from exports.checkpoint_loader import load_weights_from_export
    from weight_loader import ScaleUnderflowError, load_quant_weights_from_hf, load_weights_from_hf

    try:
        if hf_model is None:
            load_weights_from_export(backend_model, model_type, dtype)
        elif config.quant_mode is None:
            load_weights_from_hf(backend_model, model_type, dtype, hf_model=hf_model)
        else:
            load_quant_weights_from_hf(backend_model, model_type, dtype, config.quant_mode, quantized_model=hf_model)
    except ScaleUnderflowError as error:  # the model's weights and --dtype float16: the user's choice can fix it
        raise UsageError(f"{error} (--dtype float32)") from None


def generate_and_print(
    generate: Generate, encoding: tiktoken.Encoding, prompt_tokens: list[int], args: argparse.Namespace
) -> None:
    """Samples --max-new-tokens tokens after the prompt, printing each as it comes, then the speed."""
    import torch

    from sources.tokenizer import TokenPrinter

    idx = torch.tensor([prompt_tokens], dtype=torch.long)  # [batch = 1, prompt]
    generator = torch.Generator().manual_seed(args.seed)
    printer = TokenPrinter(encoding)
    print(SEPARATOR)
    print(args.input_text, end="", flush=True)
    start = time.perf_counter()
    generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator, printer)
    elapsed = time.perf_counter() - start
    printer.finish()
    print(f"\n{SEPARATOR}")
    print(f"Generated {args.max_new_tokens} tokens in {elapsed:.2f} s ({args.max_new_tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    run(main)
