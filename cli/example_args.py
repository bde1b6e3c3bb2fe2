"""example.py's command line: its flags, and every check that needs no model, so that `--help` and a mistake answer
at once. Only the standard library is imported up here (torch, transformers and ModelOpt take seconds); a check that
needs more imports it where it runs. A mistake is a UsageError: one line and exit status 2 (cli/__init__.py).
"""

import argparse
import importlib
import importlib.util
import json
import os

from cli import OUT_DIR, ArgumentParser, UsageError, checks, make_out_dir
from config import (
    ACTIVATION_QUANT_MODES,
    AUTO_QUANT_MODE,
    EFFECTIVE_BITS_RANGE,
    INT4_BLOCK_SIZE,
    KV_CACHE_MODES,
    LM_HEAD_MODES,
    QUANT_MODES,
)
from quant.kv_cache import INT8_KV_NOT_EXPORTED
from quant.lm_head import DEFAULT_CALIBRATION, INT4_HEAD_NOT_EXPORTED, check_lm_head_mode
from sources.hub import BUNDLED_MODEL_DIR, DEFAULT_MODEL, HUB_MODELS

# Why a quantized KV cache does not go to the standard ONNX file (yet): one sentence for both refusals.
ONNX_KV_CACHE = "writes a float32 KV cache, with no Q/DQ on the keys and values"
# The ONNX Runtime flavor's: GroupQueryAttention stores int8 keys and values on a CPU, and has no float8 kernel there.
ORT_KV_CACHE = "--onnx-flavor ort stores the KV cache in float32 or int8 (ONNX Runtime's CPU attention has no float8)"
ONNX_FLAVORS = ("standard", "ort")  # exports/onnx_export.py's file, exports/onnx_fused.py's
DEFAULT_PROMPT = "The best way to learn something new is"
# Below the least, sampling is greedy in all but name, and far below it logits / temperature overflows float32; above
# the most, every token among the top k is about as likely as another, which is noise, not text.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
DEFAULT_RECIPE = os.path.join(OUT_DIR, "autoquantize_recipe.json")
DEFAULT_CALIBRATION_SAMPLES = 32
# What only generation uses: with --export-only, given other than their defaults, they would be ignored.
GENERATION_OPTIONS = ("input_text", "max_new_tokens", "seed", "temperature", "top_k", "dtype")
NVTRIPY_INSTALL = "pip install nvtripy==0.1.7 -f https://nvidia.github.io/TensorRT-Incubator/packages.html"
NO_GPU = "a CUDA GPU, and this machine has none"
SAVE_QUANTIZED_DEFAULT = "out/QUANT_MODE.pt"  # --save-quantized without a path: out/ and the mode's name
FLOAT8_MIN_CAPABILITY = (8, 9)  # TensorRT runs float8 on Ada (8.9), Hopper (9.0) and newer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line and checks everything that can be checked without loading a model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    export = check_model_args(args, parser)
    check_generation_args(args)
    check_calibration_args(args, export)
    check_export_flags(args)
    check_saved_model_args(args)
    check_lm_head_args(args)
    check_auto_quantize_args(args)
    check_outputs_apart(args)
    check_export_only(args, parser)
    return args


def build_parser() -> ArgumentParser:
    """example.py's flags, in the order --help lists them."""
    parser = ArgumentParser(
        description="Generate text with GPT-2, optionally quantized by NVIDIA ModelOpt, on Tripy (TensorRT) on a GPU, "
        "or on its PyTorch twin on the CPU.",
        epilog="example: python example.py --quant-mode int4-weight-only --input-text 'The meaning of life is'",
    )
    add_model_args(parser)
    add_quantization_args(parser)
    add_generation_args(parser)
    add_calibration_args(parser)
    add_output_args(parser)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The prompt and the model it goes to."""
    parser.add_argument(
        "--input-text", metavar="TEXT", default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)"
    )
    parser.add_argument(
        "--model-type",
        metavar="NAME_OR_DIR",
        help=f"{', '.join(HUB_MODELS)} (from the Hugging Face Hub), a local GPT-2 checkpoint directory, one "
        "written by --export-dir, which runs with the weights and scales it holds, or a folder written by "
        "--export-onnx, which ONNX Runtime runs "
        f"(default: {DEFAULT_MODEL}, or the bundled model in bundled_model/ when {DEFAULT_MODEL} cannot be downloaded)",
    )


def add_quantization_args(parser: argparse.ArgumentParser) -> None:
    """How ModelOpt quantizes the model, and AutoQuantize's budget and recipes."""
    parser.add_argument(
        "--quant-mode",
        choices=(*QUANT_MODES, AUTO_QUANT_MODE),
        help=f"quantize with ModelOpt before running; {AUTO_QUANT_MODE}: each block linear in the one of the three "
        "modes, or unquantized, that ModelOpt's AutoQuantize finds costs the least quality within --effective-bits "
        "(default: no quantization)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHE_MODES,
        help="with --quant-mode: also quantize the keys and values attention reads (ModelOpt's K and V quantizers, a "
        "scale per layer each), calibrated with the weights. float8 (ModelOpt's FP8_KV_CFG) is the cache serving "
        "engines store: an --export-dir export asks vLLM for it, twice the tokens in the same memory. int8 is the "
        "cache ONNX Runtime's GroupQueryAttention stores on a CPU, which has no float8 kernel (--export-onnx DIR "
        "--onnx-flavor ort), a quarter of float32's bytes read per step; --export-dir cannot hold it (default: keys "
        "and values in the model's dtype)",
    )
    parser.add_argument(
        "--lm-head",
        choices=LM_HEAD_MODES,
        help="with --quant-mode: also quantize the output layer (lm_head, untied from the input embedding, which stays "
        "as it is) in this format, calibrated with the block linears; on a CPU it is the largest matmul of a step. "
        "int8 goes with int8-weight-only only (max calibration); --export-dir stores int8 only, vLLM serves neither. "
        "Its perplexity cost: docs/quality.md#a-quantized-output-layer (default: off; float8 quantizes lm_head in "
        "float8 anyway)",
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


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    """How the text is sampled, and what runs the model."""
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


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """The text that calibration runs through the model."""
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


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """What a run writes (exports, a saved model) or restores, and what it prints about the quantizers."""
    parser.add_argument(
        "--export-dir",
        metavar="DIR",
        help="after calibration, also write the quantized model to DIR as ModelOpt's unified Hugging Face checkpoint "
        "(docs/export.md): --model-type DIR runs it and transformers loads it; vLLM serves the float8 one, and "
        "serve_vllm.py the int8-smoothquant one in vLLM's int8 layout (its ModelOpt loader reads no int8 or int4); "
        "TensorRT-LLM reads the format, but was never run on it here",
    )
    parser.add_argument(
        "--export-onnx",
        metavar="DIR",
        help="after calibration (or restoring, or from an export), also write the model to DIR/model.onnx with its "
        "weights stored quantized, for TensorRT (trtexec) and ONNX Runtime, with its config and tokenizer "
        "(docs/onnx.md); --model-type DIR runs it",
    )
    parser.add_argument(
        "--onnx-flavor",
        choices=ONNX_FLAVORS,
        help="the file --export-onnx writes: standard, in standard operators that TensorRT, ONNX Runtime and other "
        "runtimes read; or ort, in ONNX Runtime's own fused operators, its fastest on a CPU, for int8 and int4 "
        "weights, which TensorRT cannot read (docs/onnx.md; default: standard)",
    )
    parser.add_argument("--export-only", action="store_true", help="stop after writing --export-dir or --export-onnx")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --export-dir or --export-onnx write into a folder that is not empty, replacing the files of the "
        "same names",
    )
    parser.add_argument(
        "--save-quantized",
        metavar="PATH",
        nargs="?",
        const=SAVE_QUANTIZED_DEFAULT,
        help="after calibration, write the quantized model to PATH, a new file, for --load-quantized: ModelOpt's "
        "state and the weights, int8 and int4 ones as integers (without PATH: out/QUANT_MODE.pt, such as "
        "out/int4-weight-only.pt)",
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


def check_model_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """The model: a Hub name, a checkpoint folder, an export or an ONNX folder, and the flags each takes. Returns
    whether it is an export (written by --export-dir)."""
    export = is_export(args.model_type)
    if is_onnx_folder(args.model_type):
        check_onnx_folder_args(args, parser)
    elif args.model_type is not None and not export:  # an export is checked as it is read
        checks.check_model_type(args.model_type)
        if args.quant_mode in ("int4-weight-only", AUTO_QUANT_MODE):  # before a Hub model is downloaded
            checks.check_int4_width(args.model_type, "use --quant-mode int8-weight-only or float8")
        if args.lm_head == "int4-weight-only":
            checks.check_int4_width(args.model_type, "use --lm-head int8-weight-only")
    if export:
        checks.check_path_name(args.model_type, "--model-type")  # safetensors cannot open a path that is not UTF-8
        check_export_args(args)
    return export


def check_generation_args(args: argparse.Namespace) -> None:
    """The prompt and the sampling."""
    checks.check_prompt(args.input_text, "--input-text")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_temperature(args.temperature)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")


def check_calibration_args(args: argparse.Namespace, export: bool) -> None:
    """What calibration reads, and the K and V quantizers it calibrates: only for a model example.py quantizes."""
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
    if args.kv_cache is not None and args.load_quantized is not None:
        raise UsageError(
            "--load-quantized restores the quantizers it was saved with, K and V among them: drop --kv-cache"
        )
    if args.kv_cache is not None and args.quant_mode is None:
        raise UsageError("--kv-cache needs --quant-mode: its K and V quantizers are calibrated with the weights")
    if args.kv_cache is not None and args.export_onnx is not None and args.onnx_flavor != "ort":
        remedy = "add --onnx-flavor ort" if args.kv_cache == "int8" else "use --export-dir, which keeps it"
        raise UsageError(f"--export-onnx {ONNX_KV_CACHE}: drop --kv-cache, or {remedy}")
    if args.kv_cache == "float8" and args.export_onnx is not None:
        raise UsageError(f"{ORT_KV_CACHE}: use --kv-cache int8, or --export-dir for float8")
    if args.quant_mode is not None and args.load_quantized is None and not export:
        checks.check_datasets_cache()


def check_export_flags(args: argparse.Namespace) -> None:
    """--export-dir, --export-onnx and the flags that need one of them; each folder can be written."""
    if args.export_dir is not None and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--export-dir needs --quant-mode or --load-quantized: it exports the quantized checkpoint")
    if args.export_dir is not None and args.kv_cache == "int8":  # before calibrating: ModelOpt's exporter would stop
        raise UsageError(f"--export-dir with --kv-cache int8: {INT8_KV_NOT_EXPORTED}")
    if args.export_only and args.export_dir is None and args.export_onnx is None:
        raise UsageError("--export-only needs --export-dir or --export-onnx")
    if args.overwrite and args.export_dir is None and args.export_onnx is None:
        raise UsageError("--overwrite needs --export-dir or --export-onnx: they are the folders example.py writes")
    if args.export_dir is not None:
        check_export_dir(args.export_dir, args.model_type, args.overwrite)
    if args.export_onnx is not None:
        check_export_dir(args.export_onnx, args.model_type, args.overwrite, "--export-onnx")
    if args.onnx_flavor is not None and args.export_onnx is None:
        raise UsageError("--onnx-flavor needs --export-onnx: it chooses the file that writes")
    if args.onnx_flavor == "ort" and args.quant_mode in ACTIVATION_QUANT_MODES:
        raise UsageError(
            f"--onnx-flavor ort holds int8 and int4 weights, and {args.quant_mode} quantizes activations too: "
            "export it with --onnx-flavor standard"
        )


def check_saved_model_args(args: argparse.Namespace) -> None:
    """--load-quantized reads a file that exists; --save-quantized writes a new one; --verbose has quantizers to
    print."""
    if args.load_quantized is not None:
        if os.path.isdir(args.load_quantized):
            raise UsageError(f"--load-quantized {args.load_quantized} is a folder: name a file --save-quantized wrote")
        if not os.path.isfile(args.load_quantized):
            raise UsageError(f"--load-quantized: no such file: {args.load_quantized}")
        try:
            open(args.load_quantized, "rb").close()
        except OSError as error:
            raise UsageError(f"cannot read --load-quantized {args.load_quantized}: {error.strerror}") from None
        refuse_with_load_quantized(calibration_data=args.calibration_data, save_quantized=args.save_quantized)
    elif args.save_quantized is not None and args.quant_mode is None:
        raise UsageError("--save-quantized needs --quant-mode: it saves the calibrated model")
    if args.save_quantized == SAVE_QUANTIZED_DEFAULT:
        args.save_quantized = os.path.join(OUT_DIR, f"{args.quant_mode}.pt")
        make_out_dir(args.save_quantized)
    if args.save_quantized is not None:
        checks.check_output_file(args.save_quantized, "--save-quantized", new=True)
    if args.verbose and args.quant_mode is None and args.load_quantized is None:
        raise UsageError("--verbose prints the quantizers: it needs --quant-mode or --load-quantized")


def check_lm_head_args(args: argparse.Namespace) -> None:
    """--lm-head quantizes the output layer beside one mode's calibration, in a format the twin holds beside it
    (quant/lm_head.py's rules), and that the outputs asked for can store."""
    if args.lm_head is None:
        return
    if args.load_quantized is not None:
        raise UsageError("--load-quantized restores the output layer as it was saved: --lm-head does not apply")
    if args.quant_mode is None:
        raise UsageError("--lm-head needs --quant-mode: the output layer is calibrated with the block linears")
    if args.quant_mode == AUTO_QUANT_MODE:
        raise UsageError(
            f"--lm-head goes with one mode's calibration: --quant-mode {AUTO_QUANT_MODE} searches the block linears "
            "only, and leaves the output layer unquantized"
        )
    try:
        check_lm_head_mode(args.quant_mode, args.lm_head, DEFAULT_CALIBRATION[args.quant_mode])
    except ValueError as error:
        raise UsageError(f"--lm-head {args.lm_head} with --quant-mode {args.quant_mode}: {error}") from None
    if args.lm_head == "int4-weight-only" and args.export_dir is not None:
        raise UsageError(f"--export-dir with --lm-head {args.lm_head}: {INT4_HEAD_NOT_EXPORTED}")


def refuse_with_load_quantized(**values: object) -> None:
    """What only calibrating takes, given with --load-quantized (argparse's names: recipe for --recipe): the refusal
    names the first given."""
    given = next((name for name, value in values.items() if value is not None), None)
    if given is not None:
        raise UsageError(f"--load-quantized restores a calibrated model: --{given.replace('_', '-')} does not apply")


def check_export_only(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--export-only stops before generating: a generation option given with it would be ignored."""
    if args.export_only:
        changed = [name for name in GENERATION_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if changed:
            options = ", ".join(f"--{name.replace('_', '-')}" for name in changed)
            raise UsageError(f"--export-only stops before generating: {options} would do nothing")


def check_outputs_apart(args: argparse.Namespace) -> None:
    """Two outputs of one run never land on the same file, and the export writes its folder alone."""
    files = [("--save-quantized", args.save_quantized)]
    if args.effective_bits is not None:
        files.append(("--recipe-out", recipe_out_path(args)))
    files = [(flag, path) for flag, path in files if path is not None]
    folders = [(flag, path) for flag, path in (("--export-dir", args.export_dir), ("--export-onnx", args.export_onnx))]
    folders = [(flag, path) for flag, path in folders if path is not None]
    for flag, path in files:
        for folder_flag, folder in folders:
            if checks.is_within(path, folder):
                raise UsageError(f"{flag} {path} is inside {folder_flag} {folder}: keep it out of the export")
    if len(folders) == 2 and (
        checks.is_within(args.export_onnx, args.export_dir) or checks.is_within(args.export_dir, args.export_onnx)
    ):
        raise UsageError(
            f"--export-dir {args.export_dir} and --export-onnx {args.export_onnx} overlap: name two separate folders"
        )
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
            ("--kv-cache", args.kv_cache),
            ("--lm-head", args.lm_head),
            ("--verbose", args.verbose or None),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{args.model_type} is an exported checkpoint, calibrated already: {', '.join(given)} "
            f"{'is' if len(given) == 1 else 'are'} for a model that example.py quantizes"
        )
    from exports.quant_algos import export_modes  # the standard library only: the export's small JSON file

    quant_algo, quant_mode, kv_cache = export_modes(args.model_type)
    if args.quant_mode is not None and quant_mode is not None and args.quant_mode != quant_mode:
        raise UsageError(
            f"--quant-mode {args.quant_mode} conflicts with {args.model_type}, exported in {quant_mode} "
            f"({quant_algo}); leave --quant-mode out to run an export in the mode it was calibrated in"
        )
    if kv_cache is not None and args.export_onnx is not None:
        raise onnx_kv_cache_refusal(args.model_type, kv_cache)


def onnx_kv_cache_refusal(source: str, kv_cache: str) -> UsageError:
    """--export-onnx of a model that has a quantized KV cache: an export's, seen here, or a restored one's, seen as
    exports/onnx_export.py reads it."""
    remedy = "--onnx-flavor ort" if kv_cache == "int8" else "--export-dir"
    return UsageError(f"--export-onnx {ONNX_KV_CACHE}, and {source} has a {kv_cache} one: use {remedy}")


def is_onnx_folder(model_type: str | None) -> bool:
    """Whether --model-type names a folder written by --export-onnx."""
    return model_type is not None and os.path.isfile(os.path.join(model_type, "model.onnx"))


def check_onnx_folder_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """An ONNX folder runs in ONNX Runtime as it was exported: what quantizes, saves, exports or picks a backend or a
    compute type does not apply to it."""
    quantizing = ("quant_mode", "lm_head", "effective_bits", "recipe", "recipe_out", "calibration_data")
    quantizing += ("num_calibration_samples",)
    given = [
        f"--{name.replace('_', '-')}"
        for name in (*quantizing, "load_quantized", "save_quantized", "export_dir", "export_onnx", "backend", "dtype")
        if getattr(args, name) != parser.get_default(name)
    ]
    given += ["--verbose"] if args.verbose else []
    if given:
        raise UsageError(
            f"{args.model_type} is an ONNX folder (written by --export-onnx), which ONNX Runtime runs as it was "
            f"exported: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it"
        )


def check_auto_quantize_args(args: argparse.Namespace) -> None:
    """--quant-mode auto takes either --effective-bits (search, and save the result) or --recipe (reuse one), or,
    with --load-quantized, neither: the file holds each layer's format."""
    auto = args.quant_mode == AUTO_QUANT_MODE
    if args.load_quantized is not None:
        refuse_with_load_quantized(effective_bits=args.effective_bits, recipe=args.recipe)
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
        from quant import auto_quantize  # torch and ModelOpt take seconds to import, but the model is not loaded yet

        try:
            auto_quantize.load_recipe(args.recipe)
        except ValueError as error:
            raise UsageError(f"--recipe: {error}") from None
    if args.recipe_out is not None and args.effective_bits is None:
        raise UsageError("--recipe-out needs --effective-bits: it saves what the search chose")
    if args.effective_bits is not None:  # the user's own --recipe-out is never replaced; the default one is
        make_out_dir(recipe_out_path(args))
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


def check_export_dir(export_dir: str, model_type: str | None, overwrite: bool, flag: str = "--export-dir") -> None:
    """Before calibrating: the export replaces no file unless --overwrite, never the model's own, and can be
    written. The bundled model counts as a source: it is what runs when the default cannot be downloaded."""
    sources = tuple(path for path in (model_type, BUNDLED_MODEL_DIR) if path is not None and os.path.isdir(path))
    checks.check_output_dir(export_dir, flag, overwrite, sources)


def check_model_fits(
    args: argparse.Namespace, model_type: str, hf_config: object, quant_mode: str | None, prompt_len: int
) -> None:
    """Once the model's config is read: the prompt and the new tokens fit its context, and int4's blocks its width."""
    context = hf_config.n_positions
    if prompt_len + args.max_new_tokens > context:
        raise UsageError(
            f"the prompt ({prompt_len} tokens) plus --max-new-tokens ({args.max_new_tokens}) is longer than "
            f"the {context} tokens the model can attend to: shorten the prompt or lower --max-new-tokens"
        )
    width = hf_config.n_embd
    if quant_mode in ("int4-weight-only", AUTO_QUANT_MODE) and width % INT4_BLOCK_SIZE:
        raise UsageError(
            f"--quant-mode {args.quant_mode} quantizes blocks of {INT4_BLOCK_SIZE} input features in int4, and "
            f"{model_type} is {width} wide, not a multiple of {INT4_BLOCK_SIZE}: use int8-weight-only or float8"
        )
    if args.lm_head == "int4-weight-only" and width % INT4_BLOCK_SIZE:
        raise UsageError(
            f"--lm-head int4-weight-only quantizes blocks of {INT4_BLOCK_SIZE} input features, and {model_type} is "
            f"{width} wide, not a multiple of {INT4_BLOCK_SIZE}: use --lm-head int8-weight-only"
        )


def choose_backend(requested: str, model_type: str | None = None) -> tuple[str, str]:
    """The backend to run on, "tripy", "tripy-cpu", "torch", or "onnxruntime" for a folder --export-onnx wrote, and
    why, in a few words. auto never picks tripy-cpu."""
    if is_onnx_folder(model_type):  # parse_args has refused --backend for it
        return "onnxruntime", f"ONNX Runtime on CPU, the ONNX folder {model_type}: no calibration"
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
