"""Generates text with GPT-2, optionally quantized by NVIDIA ModelOpt, on Tripy (TensorRT) or its PyTorch twin.

    python example.py --quant-mode int4-weight-only

The steps, top to bottom in `main`:
1. load GPT-2 from Hugging Face (or the bundled model when the Hub is unreachable),
2. quantize and calibrate it with ModelOpt (with --quant-mode),
3. load its weights and scales into the Tripy GPT (model.py) and compile it with TensorRT, or, without a GPU or
   without nvtripy, into the PyTorch twin (reference.py), which runs the same math on the CPU,
4. sample new tokens, printing each as soon as it exists.

Only the standard library is imported up here: torch, transformers and ModelOpt take seconds to import, and a
mistake on the command line should be reported at once. Each step imports what it needs.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import importlib.util
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cli import ArgumentParser, UsageError, run
from config import INT4_BLOCK_SIZE, QUANT_MODES
from hub import BUNDLED_MODEL_DIR, DEFAULT_MODEL, HUB_MODELS

if TYPE_CHECKING:
    import tiktoken
    import torch
    from transformers import GPT2LMHeadModel

    from config import GPTConfig

DEFAULT_PROMPT = "The best way to learn something new is"
CALIBRATION_EXTENSIONS = (".txt", ".json", ".jsonl")
NVTRIPY_INSTALL = "pip install nvtripy==0.1.7 -f https://nvidia.github.io/TensorRT-Incubator/packages.html"
SEPARATOR = "-" * 80
# generate(idx [1, prompt], max_new_tokens, temperature, top_k, generator, on_token) -> [1, prompt + new tokens]
Generate = Callable[..., "torch.Tensor"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend, backend_reason = choose_backend(args.backend)
    dtype = args.dtype or ("float16" if backend == "tripy" else "float32")
    print(f"Backend: {backend} ({backend_reason})")

    # The arguments are good: now the imports that take seconds.
    import torch
    import transformers

    from tokenizer import gpt2_encoding
    from weight_loader import config_from_hf

    transformers.logging.disable_progress_bar()  # loading a checkpoint takes a moment; its progress bar is noise
    encoding = gpt2_encoding()
    # "<|endoftext|>" in a prompt is GPT-2's document separator, not literal text.
    prompt_tokens = encoding.encode(args.input_text, allowed_special="all")
    if args.calibration_data == "cnn_dailymail":
        check_hub_reachable_for_calibration()

    start = time.perf_counter()
    model_type, hf_model = load_hf_model(args.model_type)
    num_params = sum(p.numel() for p in hf_model.parameters())
    print(f"Model: {model_type} ({num_params / 1e6:.1f}M parameters), loaded in {time.perf_counter() - start:.1f} s")
    context = hf_model.config.n_positions
    if len(prompt_tokens) + args.max_new_tokens > context and not args.export_only:
        raise UsageError(
            f"the prompt ({len(prompt_tokens)} tokens) plus --max-new-tokens ({args.max_new_tokens}) is longer than "
            f"the {context} tokens the model can attend to: shorten the prompt or lower --max-new-tokens"
        )
    width = hf_model.config.n_embd
    if args.quant_mode == "int4-weight-only" and width % INT4_BLOCK_SIZE and not args.export_only:
        raise UsageError(
            f"--quant-mode int4-weight-only quantizes blocks of {INT4_BLOCK_SIZE} input features, and {model_type} is "
            f"{width} wide, not a multiple of {INT4_BLOCK_SIZE}: use int8-weight-only or float8"
        )

    quant_mode = args.quant_mode
    if args.load_quantized is not None:
        hf_model, quant_mode = load_quantized(hf_model, args.load_quantized, quant_mode)
    elif quant_mode is not None:
        device = "cuda" if backend == "tripy" else "cpu"
        quantize(hf_model, quant_mode, args.calibration_data, args.num_calibration_samples, device)
    if args.save_quantized is not None:
        save_quantized(hf_model, args.save_quantized)
    if args.verbose:
        import modelopt.torch.quantization as mtq

        mtq.print_quant_summary(hf_model)  # every quantizer: on or off, bits, axis or blocks, amax
    if args.export_dir is not None:
        export_quantized(hf_model, args.export_dir)
        if args.export_only:
            return

    config = config_from_hf(
        hf_model,
        seq_len=len(prompt_tokens) + args.max_new_tokens,
        batch_size=1,
        dtype=dtype,
        quant_mode=quant_mode,
    )
    if backend == "tripy":
        generate = build_tripy_generator(config, model_type, hf_model)
    else:
        generate = build_torch_generator(config, model_type, hf_model)

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line and checks everything that can be checked without loading a model."""
    parser = ArgumentParser(
        description="Generate text with GPT-2, optionally quantized by NVIDIA ModelOpt, on Tripy (TensorRT) on a GPU, "
        "or on its PyTorch twin on the CPU.",
        epilog="example: python example.py --quant-mode int4-weight-only --input-text 'The meaning of life is'",
    )
    parser.add_argument(
        "--input-text", metavar="TEXT", default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)"
    )
    parser.add_argument(
        "--model-type",
        metavar="NAME_OR_DIR",
        help=f"{', '.join(HUB_MODELS)} (from the Hugging Face Hub), or a local GPT-2 checkpoint directory "
        f"(default: {DEFAULT_MODEL}, or the bundled model in bundled_model/ when {DEFAULT_MODEL} cannot be downloaded)",
    )
    parser.add_argument(
        "--quant-mode", choices=QUANT_MODES, help="quantize with ModelOpt before running (default: no quantization)"
    )
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default: 0)"
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=0.8,
        help="below 1 more predictable, above 1 wilder (default: 0.8)",
    )
    parser.add_argument(
        "--top-k", metavar="K", type=int, default=40, help="sample among the K most likely tokens (default: 40)"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "tripy", "torch"),
        default="auto",
        help="tripy: TensorRT on a CUDA GPU; torch: the PyTorch twin on the CPU; auto (default): tripy when nvtripy "
        "imports and a CUDA GPU is visible, otherwise torch",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        help="compute type (default: float16 on tripy; float32 on torch, because float16 matmuls are slow on a CPU)",
    )
    parser.add_argument(
        "--calibration-data",
        metavar="NAME_OR_FILE",
        help="text to calibrate on: cnn_dailymail, or a local .txt (one sample per paragraph), .json or .jsonl "
        "(a 'text' field per record) (default: cnn_dailymail, or data/calibration.txt when the Hub is unreachable)",
    )
    parser.add_argument(
        "--num-calibration-samples",
        metavar="N",
        type=int,
        default=32,
        help="text samples to calibrate on: more give better scales and take longer. int4's AWQ search is the slow "
        "one: on 2 CPU cores, 32 of the shipped paragraphs take about 3 s for the bundled model and 40 s for gpt2 "
        "(default: 32)",
    )
    parser.add_argument(
        "--export-dir",
        metavar="DIR",
        help="after calibration, also write the quantized model to DIR as a Hugging Face checkpoint that TensorRT-LLM "
        "and vLLM load",
    )
    parser.add_argument("--export-only", action="store_true", help="stop after writing --export-dir")
    parser.add_argument(
        "--save-quantized",
        metavar="PATH",
        help="after calibration, write the quantized model to PATH with ModelOpt's mto.save (weights and quantizer "
        "states), for --load-quantized",
    )
    parser.add_argument(
        "--load-quantized",
        metavar="PATH",
        help="restore a model written by --save-quantized or qat.py instead of calibrating (its mode comes from the "
        "file; --quant-mode, if given, must match it)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print ModelOpt's summary of the quantized model's quantizers"
    )
    args = parser.parse_args(argv)

    if args.model_type is not None and args.model_type not in HUB_MODELS and not os.path.isdir(args.model_type):
        raise UsageError(
            f"unknown --model-type {args.model_type!r}: expected one of {', '.join(HUB_MODELS)} "
            "or a local GPT-2 checkpoint directory"
        )
    if not args.input_text.strip():
        raise UsageError("--input-text is empty: give a prompt for the model to continue")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise UsageError(
            f"--temperature must be greater than 0, got {args.temperature} (for the likeliest tokens: --top-k 1)"
        )
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.num_calibration_samples < 1:
        raise UsageError(f"--num-calibration-samples must be at least 1, got {args.num_calibration_samples}")
    if args.calibration_data is not None:
        if args.quant_mode is None:
            raise UsageError("--calibration-data needs --quant-mode: only quantization calibrates")
        check_calibration_file(args.calibration_data)
    if args.export_dir is not None and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--export-dir needs --quant-mode or --load-quantized: it exports the quantized checkpoint")
    if args.export_only and args.export_dir is None:
        raise UsageError("--export-only needs --export-dir")
    if args.load_quantized is not None:
        if not os.path.isfile(args.load_quantized):
            raise UsageError(f"--load-quantized: no such file: {args.load_quantized}")
        if args.calibration_data is not None or args.save_quantized is not None:
            raise UsageError(
                "--load-quantized restores a calibrated model: --calibration-data and --save-quantized do not apply"
            )
    elif args.save_quantized is not None and args.quant_mode is None:
        raise UsageError("--save-quantized needs --quant-mode: it saves the calibrated model")
    if args.verbose and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--verbose prints the quantizers: it needs --quant-mode or --load-quantized")
    return args


def check_calibration_file(calibration_data: str) -> None:
    if calibration_data == "cnn_dailymail":
        return
    if not os.path.isfile(calibration_data):
        raise UsageError(
            f"calibration data not found: {calibration_data} (expected cnn_dailymail or a .txt/.json/.jsonl file)"
        )
    if os.path.splitext(calibration_data)[1].lower() not in CALIBRATION_EXTENSIONS:
        raise UsageError(f"unsupported calibration file {calibration_data}: expected a .txt, .json or .jsonl file")


def check_hub_reachable_for_calibration() -> None:
    from hub import hub_reachable

    if not hub_reachable():
        raise UsageError(
            "cannot download cnn_dailymail for calibration: the Hugging Face Hub is unreachable. "
            "Pass a local file instead, e.g. --calibration-data data/calibration.txt"
        )


def choose_backend(requested: str) -> tuple[str, str]:
    """The backend to run on, "tripy" or "torch", and why, in a few words."""
    missing = tripy_missing()
    if requested == "tripy" and missing is not None:
        install = "" if missing == "a CUDA GPU" else f"; install it with: {NVTRIPY_INSTALL}"
        raise UsageError(
            f"--backend tripy needs {missing}{install} (or use --backend torch, the PyTorch twin on the CPU)"
        )
    if requested == "torch":
        return "torch", "PyTorch twin on CPU, as asked"
    if missing is not None:
        return "torch", f"PyTorch twin on CPU; Tripy needs {missing}"
    import torch

    return "tripy", f"Tripy + TensorRT on {torch.cuda.get_device_name()}"


def tripy_missing() -> str | None:
    """What the Tripy backend lacks on this machine, or None when nvtripy imports and a CUDA GPU is visible."""
    if importlib.util.find_spec("nvtripy") is None:
        return "nvtripy, which is not installed"
    try:
        importlib.import_module("nvtripy")
    except (ImportError, OSError) as error:  # e.g. installed without its TensorRT compiler and runtime
        return f"nvtripy, which fails to import ({error})"
    import torch

    return None if torch.cuda.is_available() else "a CUDA GPU"


def load_hf_model(model_type: str | None) -> tuple[str, GPT2LMHeadModel]:
    """(the name or directory loaded, the Hugging Face GPT-2); the bundled model when the default is unreachable."""
    import hub

    try:
        return model_type or DEFAULT_MODEL, hub.load_hf_model(model_type or DEFAULT_MODEL)
    except hub.HubUnreachableError as error:
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
    return os.path.relpath(BUNDLED_MODEL_DIR), hub.load_hf_model(BUNDLED_MODEL_DIR)


def quantize(
    hf_model: GPT2LMHeadModel, quant_mode: str, calibration_data: str | None, num_samples: int, device: str
) -> None:
    """Quantizes and calibrates `hf_model` in place with ModelOpt (quantization.py prints the calibration time).

    Calibration runs the model on every sample (AWQ many times over), so it runs on `device`, the GPU when Tripy
    has one; the model then goes back to the CPU, where the weight loader reads it and Tripy wants its scales.
    """
    import datasets

    from quantization import modelopt_quantize

    datasets.disable_progress_bars()  # reading a few kilobytes of text; quantization.py shows calibration progress
    hf_model.to(device)
    try:
        modelopt_quantize(hf_model, quant_mode, dataset_name=calibration_data, num_samples=num_samples)
    except (OSError, ValueError) as error:  # calibration data that cannot be read
        raise UsageError(str(error)) from None
    hf_model.to("cpu")


def load_quantized(hf_model: GPT2LMHeadModel, path: str, quant_mode: str | None) -> tuple[GPT2LMHeadModel, str]:
    """Restores a model saved with mto.save onto `hf_model` (no calibration); returns it and its quant mode."""
    from quantization import QuantizedCheckpointError
    from quantization import load_quantized as restore

    start = time.perf_counter()
    try:
        hf_model, quant_mode = restore(hf_model, path, quant_mode)
    except QuantizedCheckpointError as error:
        raise UsageError(f"--load-quantized: {error}") from None
    print(f"Restored {quant_mode} from {path} in {time.perf_counter() - start:.1f} s (no calibration)")
    return hf_model, quant_mode


def save_quantized(hf_model: GPT2LMHeadModel, path: str) -> None:
    from quantization import save_quantized as save

    try:
        save(hf_model, path)
    except OSError as error:
        raise UsageError(f"cannot write --save-quantized {path}: {error}") from None
    print(f"Saved the quantized model to {path} (mto.save)")


def export_quantized(quantized_model: GPT2LMHeadModel, export_dir: str) -> None:
    """Writes the quantized model as a unified Hugging Face checkpoint, which TensorRT-LLM and vLLM load."""
    from export import export_checkpoint

    start = time.perf_counter()
    try:
        export_checkpoint(quantized_model, export_dir)
    except (ValueError, RuntimeError) as error:  # export.py's documented limitations
        raise UsageError(f"cannot export to {export_dir}: {error}") from None
    print(f"Exported the quantized checkpoint to {export_dir} in {time.perf_counter() - start:.1f} s")


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


def build_tripy_generator(config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel) -> Generate:
    """Loads the weights into the Tripy GPT and compiles it; returns generate(idx, max_new_tokens, ...)."""
    import nvtripy as tp

    import model

    start = time.perf_counter()
    tripy_gpt = model.GPT(config)
    load_weights(tripy_gpt, config, model_type, hf_model, getattr(tp, config.dtype))
    print(f"Loaded the weights into the Tripy GPT in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    compiled = model.compile_model(tripy_gpt, config)
    print(f"Compiled with TensorRT in {time.perf_counter() - start:.1f} s")

    def generate(idx, max_new_tokens, temperature, top_k, generator, on_token):
        return model.generate(compiled, idx, max_new_tokens, temperature, top_k, generator, on_token)

    return generate


def load_weights(
    backend_model: object, config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel, dtype: object
) -> None:
    """Copies the (quantized) Hugging Face model's weights and scales into the backend's GPT, leaving it unchanged."""
    from weight_loader import load_quant_weights_from_hf, load_weights_from_hf

    if config.quant_mode is None:
        load_weights_from_hf(backend_model, model_type, dtype, hf_model=hf_model)
    else:
        load_quant_weights_from_hf(backend_model, model_type, dtype, config.quant_mode, quantized_model=hf_model)


class TokenPrinter:
    """Prints each token as it is generated.

    GPT-2's tokens are byte strings, and a character beyond ASCII (two to four bytes in UTF-8) may be split across
    tokens, so the bytes go through an incremental UTF-8 decoder that prints a character once all of it has arrived.
    """

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: torch.Tensor) -> None:
        """token: [batch = 1, 1], the id just sampled."""
        token_bytes = self.encoding.decode_single_token_bytes(int(token[0, 0]))
        print(self.decoder.decode(token_bytes), end="", flush=True)

    def finish(self) -> None:
        """Prints what is left of a character cut off by the end of generation (as a replacement character)."""
        print(self.decoder.decode(b"", final=True), end="", flush=True)


if __name__ == "__main__":
    run(main)
