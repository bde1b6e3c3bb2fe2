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
mistake on the command line should be reported at once. Each step imports what it needs.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import checks
from cli import ArgumentParser, UsageError, run
from config import AUTO_QUANT_MODE, EFFECTIVE_BITS_RANGE, INT4_BLOCK_SIZE, QUANT_MODES
from hub import BUNDLED_MODEL_DIR, DEFAULT_MODEL, HUB_MODELS

if TYPE_CHECKING:
    import tiktoken
    import torch
    from transformers import GPT2LMHeadModel

    from config import GPTConfig

DEFAULT_PROMPT = "The best way to learn something new is"
# Below the least, sampling is greedy in all but name, and far below it logits / temperature overflows float32; above
# the most, every token among the top k is about as likely as another, which is noise, not text.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
DEFAULT_RECIPE = "autoquantize_recipe.json"
DEFAULT_CALIBRATION_SAMPLES = 32
# What only generation uses: with --export-only, given other than their defaults, they would be ignored.
GENERATION_OPTIONS = ("input_text", "max_new_tokens", "seed", "temperature", "top_k", "dtype")
NVTRIPY_INSTALL = "pip install nvtripy==0.1.7 -f https://nvidia.github.io/TensorRT-Incubator/packages.html"
NO_GPU = "a CUDA GPU, and this machine has none"
SEPARATOR = "-" * 80
FLOAT8_MIN_CAPABILITY = (8, 9)  # TensorRT runs float8 on Ada (8.9), Hopper (9.0) and newer
# generate(idx [1, prompt], max_new_tokens, temperature, top_k, generator, on_token) -> [1, prompt + new tokens]
Generate = Callable[..., "torch.Tensor"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend, backend_reason = choose_backend(args.backend)
    if backend == "tripy" and args.quant_mode == "float8":
        check_float8_gpu()
    print(f"Backend: {backend} ({backend_reason})")

    # The arguments are good: now the imports that take seconds.
    import transformers

    from tokenizer import gpt2_encoding

    transformers.logging.disable_progress_bar()  # loading a checkpoint takes a moment; its progress bar is noise
    encoding = gpt2_encoding()
    # "<|endoftext|>" in a prompt is GPT-2's document separator, not literal text.
    prompt_tokens = encoding.encode(args.input_text, allowed_special="all")

    model_type, hf_model, quant_mode = load_model(args, len(prompt_tokens))
    layer_quant_modes = None
    if args.load_quantized is not None:
        hf_model, quant_mode, layer_quant_modes = load_quantized(hf_model, args.load_quantized, quant_mode)
    elif args.quant_mode == AUTO_QUANT_MODE:
        layer_quant_modes = auto_quantize(hf_model, args, device_for(backend))
    elif args.quant_mode is not None and hf_model is not None:
        quantize(hf_model, quant_mode, args.calibration_data, args.num_calibration_samples, device_for(backend))
    if args.save_quantized is not None:
        save_quantized(hf_model, args.save_quantized)
    if args.verbose:
        import modelopt.torch.quantization as mtq

        mtq.print_quant_summary(hf_model)  # every quantizer: on or off, bits, axis or blocks, amax
    if args.export_dir is not None:
        export_quantized(hf_model, args.export_dir)
        if args.export_only:
            return

    dtype = args.dtype or ("float16" if backend == "tripy" else "float32")
    config = gpt_config(model_type, hf_model, quant_mode, layer_quant_modes, len(prompt_tokens), args, dtype)
    if backend == "tripy" and "float8" in {config.quant_mode, *(config.layer_quant_modes or {}).values()}:
        check_float8_gpu()  # again: an export, a saved model or AutoQuantize's search has said what runs
    if backend in ("tripy", "tripy-cpu"):
        generate = build_tripy_generator(config, model_type, hf_model, backend)
    else:
        generate = build_torch_generator(config, model_type, hf_model)
    generate_and_print(generate, encoding, prompt_tokens, args)


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
        help=f"{', '.join(HUB_MODELS)} (from the Hugging Face Hub), a local GPT-2 checkpoint directory, or one "
        "written by --export-dir, which runs with the weights and scales it holds "
        f"(default: {DEFAULT_MODEL}, or the bundled model in bundled_model/ when {DEFAULT_MODEL} cannot be downloaded)",
    )
    parser.add_argument(
        "--quant-mode",
        choices=(*QUANT_MODES, AUTO_QUANT_MODE),
        help=f"quantize with ModelOpt before running; {AUTO_QUANT_MODE}: each block linear in the one of the three "
        "modes, or unquantized, that ModelOpt's AutoQuantize finds costs the least quality within --effective-bits "
        "(default: no quantization)",
    )
    parser.add_argument(
        "--effective-bits",
        metavar="B",
        type=float,
        help=f"with --quant-mode {AUTO_QUANT_MODE}: the average bits per block-linear weight to stay within, from "
        f"{EFFECTIVE_BITS_RANGE[0]:g} (all int4) to {EFFECTIVE_BITS_RANGE[1]:g} (none quantized); int8 and float8 "
        "count 8",
    )
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help=f"with --quant-mode {AUTO_QUANT_MODE}: the per-layer formats a previous search saved, instead of a "
        "new search",
    )
    parser.add_argument(
        "--recipe-out",
        metavar="FILE",
        help=f"where to save the searched per-layer formats, for --recipe (default: {DEFAULT_RECIPE})",
    )
    parser.add_argument("--max-new-tokens", metavar="N", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument(
        "--seed",
        type=checks.seed,
        default=0,
        help="sampling seed, 0 to 2**64 - 1: the same seed gives the same text (default: 0)",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=checks.finite_float,
        default=0.8,
        help=f"{MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}: below 1 more predictable, above 1 wilder (default: 0.8)",
    )
    parser.add_argument(
        "--top-k", metavar="K", type=int, default=40, help="sample among the K most likely tokens (default: 40)"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "tripy", "tripy-cpu", "torch"),
        default="auto",
        help="tripy: TensorRT on a CUDA GPU; torch: the PyTorch twin on the CPU; tripy-cpu: model.py through nvtripy's "
        "frontend, its graph run by PyTorch on the CPU (tripy_cpu/, no TensorRT; for reading the Tripy code, not for "
        "speed); auto (default): tripy when nvtripy imports and a CUDA GPU is visible, otherwise torch",
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
        help="text samples to calibrate on: more give better scales and take longer. int4's AWQ search is the slow "
        "one: on 2 CPU cores, 32 of the shipped paragraphs take about 3 s for the bundled model and 40 s for gpt2 "
        f"(default: {DEFAULT_CALIBRATION_SAMPLES})",
    )
    parser.add_argument(
        "--export-dir",
        metavar="DIR",
        help="after calibration, also write the quantized model to DIR as ModelOpt's unified Hugging Face checkpoint "
        "(docs/export.md): --model-type DIR runs it and transformers loads it; vLLM serves only the float8 one (its "
        "ModelOpt loader reads neither int8 nor int4); TensorRT-LLM reads the format, but was never run on it here",
    )
    parser.add_argument("--export-only", action="store_true", help="stop after writing --export-dir")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --export-dir write into a folder that is not empty, replacing the files of the same names",
    )
    parser.add_argument(
        "--save-quantized",
        metavar="PATH",
        help="after calibration, write the quantized model to PATH with ModelOpt's mto.save (weights and quantizer "
        "states), for --load-quantized",
    )
    parser.add_argument(
        "--load-quantized",
        metavar="PATH",
        help="restore a model written by --save-quantized or qat.py instead of calibrating (its mode, or with "
        f"{AUTO_QUANT_MODE} each layer's format, comes from the file; --quant-mode, if given, must match it)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print ModelOpt's summary of the quantized model's quantizers"
    )
    args = parser.parse_args(argv)

    export = is_export(args.model_type)
    if args.model_type is not None and not export:  # an export is checked as it is read
        checks.check_model_type(args.model_type)
        if args.quant_mode in ("int4-weight-only", AUTO_QUANT_MODE):  # before a Hub model is downloaded
            checks.check_int4_width(args.model_type, "use --quant-mode int8-weight-only or float8")
    if export:
        checks.check_path_name(args.model_type, "--model-type")  # safetensors cannot open a path that is not UTF-8
        check_export_args(args)
    checks.check_prompt(args.input_text, "--input-text")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_temperature(args.temperature)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.num_calibration_samples is None:
        args.num_calibration_samples = DEFAULT_CALIBRATION_SAMPLES
    elif args.quant_mode is None or args.load_quantized is not None:
        raise UsageError("--num-calibration-samples needs --quant-mode: only quantization calibrates")
    elif args.num_calibration_samples < 1:
        raise UsageError(f"--num-calibration-samples must be at least 1, got {args.num_calibration_samples}")
    if args.calibration_data is not None:
        if args.quant_mode is None:
            raise UsageError("--calibration-data needs --quant-mode: only quantization calibrates")
        checks.check_calibration_data(args.calibration_data)
    if args.quant_mode is not None and args.load_quantized is None and not export:
        checks.check_datasets_cache()
    if args.export_dir is not None and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--export-dir needs --quant-mode or --load-quantized: it exports the quantized checkpoint")
    if args.export_only and args.export_dir is None:
        raise UsageError("--export-only needs --export-dir")
    if args.overwrite and args.export_dir is None:
        raise UsageError("--overwrite needs --export-dir: it is the only thing example.py writes")
    if args.export_dir is not None:
        check_export_dir(args.export_dir, args.model_type, args.overwrite)
    if args.load_quantized is not None:
        if os.path.isdir(args.load_quantized):
            raise UsageError(f"--load-quantized {args.load_quantized} is a folder: name a file --save-quantized wrote")
        if not os.path.isfile(args.load_quantized):
            raise UsageError(f"--load-quantized: no such file: {args.load_quantized}")
        try:
            open(args.load_quantized, "rb").close()
        except OSError as error:
            raise UsageError(f"cannot read --load-quantized {args.load_quantized}: {error.strerror}") from None
        if args.calibration_data is not None or args.save_quantized is not None:
            raise UsageError(
                "--load-quantized restores a calibrated model: --calibration-data and --save-quantized do not apply"
            )
    elif args.save_quantized is not None and args.quant_mode is None:
        raise UsageError("--save-quantized needs --quant-mode: it saves the calibrated model")
    if args.save_quantized is not None:
        checks.check_output_file(args.save_quantized, "--save-quantized", new=True)
    if args.verbose and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--verbose prints the quantizers: it needs --quant-mode or --load-quantized")
    check_auto_quantize_args(args)
    check_outputs_apart(args)
    if args.export_only:
        changed = [name for name in GENERATION_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if changed:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
            raise UsageError(f"--export-only stops before generating: {options} would do nothing")
    return args


def check_outputs_apart(args: argparse.Namespace) -> None:
    """Two outputs of one run never land on the same file, and the export writes its folder alone."""
    files = [("--save-quantized", args.save_quantized)]
    if args.effective_bits is not None:
        files.append(("--recipe-out", recipe_out_path(args)))
    files = [(flag, path) for flag, path in files if path is not None]
    for flag, path in files:
        if args.export_dir is not None and checks.is_within(path, args.export_dir):
            raise UsageError(f"{flag} {path} is inside --export-dir {args.export_dir}: keep it out of the export")
    if len(files) == 2 and os.path.realpath(files[0][1]) == os.path.realpath(files[1][1]):
        raise UsageError(f"--save-quantized and --recipe-out are the same file, {files[0][1]}: name two files")


def check_export_args(args: argparse.Namespace) -> None:
    """An export runs as it was calibrated: the options that quantize, save or restore a model do not apply to it."""
    given = [
        option
        for option, value in (
            ("--calibration-data", args.calibration_data),
            ("--num-calibration-samples", args.num_calibration_samples),
            ("--export-dir", args.export_dir),
            ("--save-quantized", args.save_quantized),
            ("--load-quantized", args.load_quantized),
            ("--verbose", args.verbose or None),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{args.model_type} is an exported checkpoint, calibrated already: {', '.join(given)} "
            f"{'is' if len(given) == 1 else 'are'} for a model that example.py quantizes"
        )


def check_auto_quantize_args(args: argparse.Namespace) -> None:
    """--quant-mode auto takes either --effective-bits (search, and save the result) or --recipe (reuse one), or,
    with --load-quantized, neither: the file holds each layer's format."""
    auto = args.quant_mode == AUTO_QUANT_MODE
    if args.load_quantized is not None:
        if args.effective_bits is not None or args.recipe is not None:
            raise UsageError("--load-quantized restores a calibrated model: --effective-bits and --recipe do not apply")
        auto = False  # a restored mix is neither searched nor built from a recipe
    for option, value in (("--effective-bits", args.effective_bits), ("--recipe", args.recipe)):
        if value is not None and not auto:
            raise UsageError(f"{option} needs --quant-mode {AUTO_QUANT_MODE}")
    if auto and (args.effective_bits is None) == (args.recipe is None):
        raise UsageError(
            f"--quant-mode {AUTO_QUANT_MODE} needs either --effective-bits (to search) or --recipe (a saved search)"
        )
    low, high = EFFECTIVE_BITS_RANGE
    if args.effective_bits is not None and not low <= args.effective_bits <= high:
        raise UsageError(
            f"--effective-bits must be between {low:g} (every layer int4) and {high:g} (none quantized), "
            f"got {args.effective_bits:g}"
        )
    if args.recipe is not None and not os.path.isfile(args.recipe):
        raise UsageError(f"recipe not found: {args.recipe} (a file that --recipe-out wrote)")
    if args.recipe is not None:
        import quantization  # torch and ModelOpt take seconds to import, but the model is not loaded yet

        try:
            quantization.load_recipe(args.recipe)
        except ValueError as error:
            raise UsageError(f"--recipe: {error}") from None
    if args.recipe_out is not None and args.effective_bits is None:
        raise UsageError("--recipe-out needs --effective-bits: it saves what the search chose")
    if args.effective_bits is not None:  # the user's own --recipe-out is never replaced; the default one is
        checks.check_output_file(recipe_out_path(args), "--recipe-out", new=args.recipe_out is not None)


def recipe_out_path(args: argparse.Namespace) -> str:
    """Where a search saves its recipe: --recipe-out, or the default when it is not given ("" is not the default)."""
    return DEFAULT_RECIPE if args.recipe_out is None else args.recipe_out


def is_export(model_type: str | None) -> bool:
    """Whether --model-type names a checkpoint written by --export-dir (ModelOpt's unified format)."""
    if model_type is None or not os.path.isdir(model_type):
        return False
    if os.path.isfile(os.path.join(model_type, "hf_quant_config.json")):
        return True
    config_path = os.path.join(model_type, "config.json")
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # not an export; checks.check_model_type names what is wrong with the file
    quantization_config = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "modelopt"


def check_temperature(temperature: float) -> None:
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise UsageError(
            f"--temperature must be from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}, got {temperature} "
            "(for the likeliest token every time: --top-k 1)"
        )


def check_export_dir(export_dir: str, model_type: str | None, overwrite: bool) -> None:
    """Before calibrating: the export replaces no file unless --overwrite, never the model's own, and can be
    written. The bundled model counts as a source: it is what runs when the default cannot be downloaded."""
    sources = tuple(path for path in (model_type, BUNDLED_MODEL_DIR) if path is not None and os.path.isdir(path))
    checks.check_output_dir(export_dir, "--export-dir", overwrite, sources)


def choose_backend(requested: str) -> tuple[str, str]:
    """The backend to run on, "tripy", "tripy-cpu" or "torch", and why, in a few words. auto never picks tripy-cpu."""
    if requested == "tripy-cpu":
        if importlib.util.find_spec("nvtripy") is None:
            raise UsageError(
                "--backend tripy-cpu needs nvtripy's frontend: pip install --no-deps nvtripy==0.1.7 colored"
            )
        import tripy_cpu

        if tripy_cpu.use() == "tensorrt":  # its stand-ins never replace a real installation
            raise UsageError(
                "--backend tripy-cpu is for machines without TensorRT, and this one has it: use --backend tripy"
            )
        return "tripy-cpu", "nvtripy's frontend on CPU, its graph run by PyTorch (tripy_cpu/); no TensorRT involved"
    missing = tripy_missing()
    if requested == "tripy" and missing == NO_GPU:  # installing nvtripy cannot help: say what runs here
        raise UsageError(
            f"--backend tripy needs {NO_GPU}: use --backend torch (the PyTorch twin), or --backend tripy-cpu to run "
            "model.py itself on the CPU executor"
        )
    if requested == "tripy" and missing is not None:
        raise UsageError(
            f"--backend tripy needs {missing}; install it with: {NVTRIPY_INSTALL} (or use --backend torch, the "
            "PyTorch twin on the CPU)"
        )
    if requested == "torch":
        return "torch", "PyTorch twin on CPU, as asked"
    if missing is not None:
        return "torch", f"PyTorch twin on CPU; Tripy needs {missing}"
    import torch

    return "tripy", f"Tripy + TensorRT on {torch.cuda.get_device_name()}"


def check_float8_gpu() -> None:
    """TensorRT's float8 kernels need compute capability 8.9 (Ada) or newer: fail at once on an older GPU."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < FLOAT8_MIN_CAPABILITY:
        raise UsageError(
            f"float8 on --backend tripy needs a GPU of compute capability "
            f"{'.'.join(map(str, FLOAT8_MIN_CAPABILITY))} or newer (Ada, Hopper, Blackwell); "
            f"{torch.cuda.get_device_name()} is {major}.{minor}: use int8-weight-only or int4-weight-only"
        )


def tripy_missing() -> str | None:
    """What the Tripy backend lacks on this machine, or None when a CUDA GPU is visible and nvtripy imports.

    The GPU comes first: without one, nvtripy (installed or not) cannot run, and advice to install it would not help.
    """
    import torch

    if not torch.cuda.is_available():
        return NO_GPU
    if importlib.util.find_spec("nvtripy") is None:
        return "nvtripy, which is not installed"
    try:
        importlib.import_module("nvtripy")
    except (ImportError, OSError) as error:  # e.g. installed without its TensorRT compiler and runtime
        return f"nvtripy, which fails to import ({error})"
    return None


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
    try:
        return os.path.relpath(BUNDLED_MODEL_DIR), hub.load_hf_model(BUNDLED_MODEL_DIR)
    except (ValueError, OSError) as error:  # a damaged copy of the repository
        raise UsageError(f"the bundled model cannot be loaded: {error}") from None


def read_export(export_dir: str, quant_mode: str | None) -> tuple[object, str]:
    """(its GPT2Config, its quantization mode) of an export, checked down to every tensor's shape."""
    from modelopt_hf import ExportFormatError, check_tensors
    from modelopt_hf import read_export as read_export_format

    try:
        fmt, hf_config = read_export_format(export_dir)
        check_tensors(export_dir, fmt, hf_config)
    except (ExportFormatError, OSError) as error:
        raise UsageError(str(error)) from None
    if quant_mode is not None and quant_mode != fmt.quant_mode:
        raise UsageError(
            f"--quant-mode {quant_mode} conflicts with {export_dir}, exported in {fmt.quant_mode} ({fmt.quant_algo}); "
            "leave --quant-mode out to run an export in the mode it was calibrated in"
        )
    return hf_config, fmt.quant_mode


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


def auto_quantize(hf_model: GPT2LMHeadModel, args: argparse.Namespace, device: str) -> dict[str, str | None]:
    """Quantizes `hf_model` in place in a per-layer mix of formats: searched by AutoQuantize within
    --effective-bits, and saved, or read from --recipe. Prints the formats; returns them by layer name."""
    import datasets

    import quantization

    datasets.disable_progress_bars()
    hf_model.to(device)  # as in `quantize`: calibration and scoring on the GPU when there is one
    samples = dict(dataset_name=args.calibration_data, num_samples=args.num_calibration_samples)
    try:
        if args.recipe is not None:
            saved_recipe = quantization.load_recipe(args.recipe)
            try:
                quantization.check_recipe(hf_model, saved_recipe)
            except ValueError as error:
                raise UsageError(f"--recipe {args.recipe}: {error}") from None
            quantization.quantize_with_recipe(hf_model, saved_recipe, **samples)
            recipe = quantization.recipe_from_model(hf_model)  # what the model now is, whatever the file says
        else:
            recipe = quantization.auto_quantize(hf_model, args.effective_bits, **samples)
    except (OSError, ValueError) as error:  # unreadable calibration data, a recipe for another model
        raise UsageError(str(error)) from None
    hf_model.to("cpu")
    print(quantization.format_recipe(recipe))
    if args.recipe is None:
        path = recipe_out_path(args)
        replaced = " (replacing the last search's)" if os.path.exists(path) else ""
        try:
            quantization.save_recipe(recipe, path)
        except OSError as error:
            raise UsageError(f"cannot write --recipe-out {path}: {error.strerror}") from None
        print(f"Saved the per-layer formats to {path}{replaced}: --recipe {path} reuses them without searching")
    return recipe.layers


def load_quantized(
    hf_model: GPT2LMHeadModel, path: str, quant_mode: str | None
) -> tuple[GPT2LMHeadModel, str, dict[str, str | None] | None]:
    """Restores a model saved with mto.save onto `hf_model` (no calibration); returns it, its quant mode, and for an
    AutoQuantize mix each layer's format (printed as the search prints it), otherwise None."""
    import quantization

    start = time.perf_counter()
    try:
        hf_model, quant_mode = quantization.load_quantized(hf_model, path, quant_mode)
    except quantization.QuantizedCheckpointError as error:
        raise UsageError(f"--load-quantized: {error}") from None
    print(f"Restored {quant_mode} from {path} in {time.perf_counter() - start:.1f} s (no calibration)")
    if quant_mode != AUTO_QUANT_MODE:
        return hf_model, quant_mode, None
    recipe = quantization.recipe_from_model(hf_model)  # the formats as the restored quantizers are
    print(quantization.format_recipe(recipe))
    return hf_model, quant_mode, recipe.layers


def save_quantized(hf_model: GPT2LMHeadModel, path: str) -> None:
    from quantization import save_quantized as save

    try:
        save(hf_model, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a file it cannot open as a RuntimeError
        raise UsageError(f"cannot write --save-quantized {path}: {error}") from None
    print(f"Saved the quantized model to {path} (mto.save)")


def export_quantized(quantized_model: GPT2LMHeadModel, export_dir: str) -> None:
    """Writes the quantized model as a unified Hugging Face checkpoint, which TensorRT-LLM and vLLM load."""
    from export import export_checkpoint

    start = time.perf_counter()
    try:
        export_checkpoint(quantized_model, export_dir)
    except (ValueError, RuntimeError, OSError) as error:  # export.py's documented limitations, a full disk
        raise UsageError(f"cannot export to {export_dir}: {error}") from None
    print(f"Exported the quantized checkpoint to {export_dir} in {time.perf_counter() - start:.1f} s")


def load_model(args: argparse.Namespace, prompt_len: int) -> tuple[str, GPT2LMHeadModel | None, str | None]:
    """(the name or folder loaded, the Hugging Face GPT-2 or None for an export, the quantization mode), after
    checking that the prompt and the new tokens fit the model and that int4's blocks fit its width."""
    start = time.perf_counter()
    if is_export(args.model_type):  # calibrated already: its weights and scales go straight into the model
        model_type, hf_model = args.model_type, None
        hf_config, quant_mode = read_export(args.model_type, args.quant_mode)
        print(f"Model: {model_type} (a ModelOpt export, {quant_mode}: no calibration)")
    else:
        model_type, hf_model = load_hf_model(args.model_type)
        hf_config, quant_mode = hf_model.config, args.quant_mode
        num_params = sum(p.numel() for p in hf_model.parameters())
        print(
            f"Model: {model_type} ({num_params / 1e6:.1f}M parameters), loaded in {time.perf_counter() - start:.1f} s"
        )
    context = hf_config.n_positions
    if prompt_len + args.max_new_tokens > context and not args.export_only:
        raise UsageError(
            f"the prompt ({prompt_len} tokens) plus --max-new-tokens ({args.max_new_tokens}) is longer than "
            f"the {context} tokens the model can attend to: shorten the prompt or lower --max-new-tokens"
        )
    width = hf_config.n_embd
    if quant_mode in ("int4-weight-only", AUTO_QUANT_MODE) and width % INT4_BLOCK_SIZE and not args.export_only:
        raise UsageError(
            f"--quant-mode {args.quant_mode} quantizes blocks of {INT4_BLOCK_SIZE} input features in int4, and "
            f"{model_type} is {width} wide, not a multiple of {INT4_BLOCK_SIZE}: use int8-weight-only or float8"
        )
    return model_type, hf_model, quant_mode


def device_for(backend: str) -> str:
    """Where calibration runs: on the GPU when Tripy has one; the weight loader reads the model back on the CPU."""
    return "cuda" if backend == "tripy" else "cpu"


def gpt_config(
    model_type: str,
    hf_model: GPT2LMHeadModel | None,
    quant_mode: str | None,
    layer_quant_modes: dict[str, str | None] | None,
    prompt_len: int,
    args: argparse.Namespace,
    dtype: str,
) -> GPTConfig:
    """The Tripy model's (and the twin's) config: the checkpoint's shape, the mode, and the sequence to generate."""
    from weight_loader import config_from_export, config_from_hf

    shape = {"seq_len": prompt_len + args.max_new_tokens, "batch_size": 1, "dtype": dtype}
    if hf_model is None:
        return config_from_export(model_type, **shape)
    return config_from_hf(hf_model, quant_mode=quant_mode, layer_quant_modes=layer_quant_modes, **shape)


def generate_and_print(
    generate: Generate, encoding: tiktoken.Encoding, prompt_tokens: list[int], args: argparse.Namespace
) -> None:
    """Samples --max-new-tokens tokens after the prompt, printing each as it comes, then the speed."""
    import torch

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


def build_tripy_generator(config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel, backend: str) -> Generate:
    """Loads the weights into the Tripy GPT and compiles it; returns generate(idx, max_new_tokens, ...).

    On tripy-cpu, tripy_cpu runs what TensorRT would; on both, it makes nvtripy's tracing faster.
    """
    import tripy_cpu

    tripy_cpu.use()
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


def load_weights(
    backend_model: object, config: GPTConfig, model_type: str, hf_model: GPT2LMHeadModel | None, dtype: object
) -> None:
    """Copies the (quantized) Hugging Face model's weights and scales, or an export's, into the backend's GPT."""
    from weight_loader import (
        ScaleUnderflowError,
        load_quant_weights_from_hf,
        load_weights_from_export,
        load_weights_from_hf,
    )

    try:
        if hf_model is None:
            load_weights_from_export(backend_model, model_type, dtype)
        elif config.quant_mode is None:
            load_weights_from_hf(backend_model, model_type, dtype, hf_model=hf_model)
        else:
            load_quant_weights_from_hf(backend_model, model_type, dtype, config.quant_mode, quantized_model=hf_model)
    except ScaleUnderflowError as error:  # the model's weights and --dtype float16: the user's choice can fix it
        raise UsageError(f"{error} (--dtype float32)") from None


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
