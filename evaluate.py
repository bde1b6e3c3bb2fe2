"""How much quality and memory each quantization mode costs: perplexity on held-out text against weight size.

For the unquantized model and each mode, the report gives the perplexity of the PyTorch twin (reference.py: the
same weights, scales and math as the Tripy model, so the quality the Tripy engine delivers), its change against
the unquantized model, the bytes the weights take stored in that format, and the seconds spent calibrating and
evaluating:

    python evaluate.py                                  # the bundled model on data/heldout.txt: a few minutes
    python evaluate.py --model-type gpt2 --chart quality.png
    python evaluate.py --modes int8-weight-only float8 int4-weight-only --onnx   # and each in ONNX Runtime

One more row shows a common mistake: int4 weights calibrated with AWQ, loaded without AWQ's pre_quant_scale. The
auto rows are per-layer mixes that ModelOpt's AutoQuantize chose (quant/auto_quantize.py), one per budget of effective
bits (--auto-bits), all from one search. The -kv rows, on request, calibrate a mode with a float8 KV cache, and the
-kv-int8 rows with an int8 one (quant/kv_cache.py); the report then gives their change against the same row without it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cli import ArgumentParser, UsageError, checks, make_out_dir, run
from cli.outputs import output_file
from config import (
    ACTIVATION_QUANT_MODES,
    AUTO_QUANT_MODE,
    EFFECTIVE_BITS_RANGE,
    INT4_BLOCK_SIZE,
    LM_HEAD_MODES,
    QUANT_MODES,
)
from sources.hub import BUNDLED_MODEL_DIR

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel

    from reference import GPT

# Only the standard library is imported up here, so that --help and a mistake on the command line answer at once;
# each function imports the torch, transformers and ModelOpt code it uses.

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = BUNDLED_MODEL_DIR
DEFAULT_EVAL_DATA = os.path.join(SCRIPT_DIR, "data", "heldout.txt")
DEFAULT_CHART = os.path.join("out", "quality.png")
UNQUANTIZED = "unquantized"
# AWQ-calibrated int4 weights run without the per-input-feature scale that AWQ folded out of them.
INT4_WITHOUT_PRE_QUANT_SCALE = "int4-weight-only-no-pre-quant-scale"
REPORT_MODES = (
    UNQUANTIZED,
    "int8-weight-only",
    "float8",
    "int4-weight-only",
    INT4_WITHOUT_PRE_QUANT_SCALE,
    AUTO_QUANT_MODE,  # a row per budget in auto_bits, named "auto <bits> bits"
)
DEFAULT_AUTO_BITS = (4.5, 5.0, 5.5, 6.0, 7.0, 8.0)
# Rows on request (--modes), for quantization-aware training: int4 calibrated with plain max instead of AWQ, each
# int4 model fine-tuned with its quantizers in place (training.finetune), and, as the control, the unquantized model
# fine-tuned the same way, to tell what QAT wins from what more training alone wins.
FINETUNED = "unquantized-finetuned"
INT4_MAX = "int4-weight-only-max"
QAT_MODES = (FINETUNED, INT4_MAX, "int4-weight-only-qat", "int4-weight-only-max-qat")
# Rows on request, for a quantized KV cache (quant/kv_cache.py): each mode calibrated with ModelOpt's K and V
# quantizers too, in float8 ("-kv", the first such rows, whose name stays) or in int8 ("-kv-int8").
KV_SUFFIXES = {"-kv": "float8", "-kv-int8": "int8"}
KV_MODES = tuple(f"{mode}-kv" for mode in QUANT_MODES)
# Rows on request, for int8 W8A8: SmoothQuant as the mode calibrates it (the MLP's c_proj unsmoothed, see
# quantization.unsmooth_after_gelu), the same layers with plain max calibration and no smoothing (ModelOpt's
# INT8_DEFAULT_CFG recipe), and SmoothQuant left on every layer, the MLP's c_proj too (a model only the twin computes:
# no runtime here can fold a factor through GELU).
INT8_W8A8_MAX = "int8-smoothquant-max"
SMOOTHQUANT_EVERY_LAYER = "int8-smoothquant-every-layer"
SMOOTHQUANT_MODES = ("int8-smoothquant", INT8_W8A8_MAX, SMOOTHQUANT_EVERY_LAYER)
# The rows calibrated with plain "max" instead of their mode's own algorithm, and that mode.
MAX_CALIBRATED = {INT4_MAX: "int4-weight-only", INT8_W8A8_MAX: "int8-smoothquant"}
# Rows on request, for a quantized output layer (config.lm_head_mode): the mode with lm_head in the same format,
# calibrated by ModelOpt with the blocks. On a CPU the output layer is the largest matmul of a step (docs/benchmark.md).
LM_HEAD_SUFFIX = "-lm-head"
LM_HEAD_ROWS = tuple(f"{mode}{LM_HEAD_SUFFIX}" for mode in LM_HEAD_MODES)
# int8 KV rows for every mode and for the quantized output layer's rows: ONNX Runtime's flavor runs both on a CPU.
KV_INT8_ROWS = tuple(f"{mode}-kv-int8" for mode in (*QUANT_MODES, *LM_HEAD_ROWS))
ALL_MODES = (*REPORT_MODES, *SMOOTHQUANT_MODES, *QAT_MODES, *KV_MODES, *LM_HEAD_ROWS, *KV_INT8_ROWS)
DEFAULT_QAT_STEPS = 100  # a tenth of the 1,000 steps that trained the bundled model
DEFAULT_QAT_LR = 2e-4  # where train.py's schedule ended
# The Tripy model deploys in float16: embeddings, LayerNorms, biases, unquantized layers and every scale.
HIGH_PRECISION_BYTES = 2


@dataclass
class Row:
    mode: str
    perplexity: float
    weight_bytes: int
    calibration_seconds: float
    eval_seconds: float
    effective_bits: float | None = None  # auto rows: the bits per block-linear weight of the mix chosen
    training_seconds: float = 0.0  # fine-tuning (QAT) time, on top of the calibration time


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging  # the arguments are good: the slow imports

    from training.finetune import TrainingDivergedError

    transformers_logging.disable_progress_bar()  # loading a checkpoint takes a moment; its progress bar is noise
    if args.onnx:
        print(
            "ONNX Runtime: its default threads (one per physical core); torch on 1 thread while it runs (2 pools fight)"
        )
    try:
        rows = evaluate(
            args.model_type,
            args.modes,
            args.eval_data,
            args.max_tokens,
            args.context,
            args.num_calibration_samples,
            args.calibration_data,
            args.auto_bits,
            args.qat_steps,
            args.qat_lr,
            args.qat_batch_size,
            args.onnx,
        )
    except TrainingDivergedError as error:
        raise UsageError(f"--qat-lr {args.qat_lr:g} is too high for this model: {error}") from None
    except (ValueError, OSError) as error:  # not a GPT-2, an unreadable file, too little text, a Hub model offline
        raise UsageError(str(error)) from None
    print(format_table(rows))
    if args.chart is not None:
        save_chart(rows, args.chart, title=os.path.basename(os.path.normpath(args.model_type)))
        print(f"Saved the chart to {args.chart}")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_sizes(args)
    checks.check_model_type(args.model_type)
    int4_rows = [mode for mode in args.modes if "int4" in mode or mode == AUTO_QUANT_MODE]
    if int4_rows:  # before a Hub model is downloaded
        checks.check_int4_width(args.model_type, f"leave {int4_rows[0]} out of --modes")
    check_finetuning_args(args)
    checks.check_text_file(args.eval_data, "--eval-data")
    check_options_apply(args, parser)
    if args.calibration_data is not None:
        checks.check_calibration_data(args.calibration_data)
    if set(args.modes) - {UNQUANTIZED, FINETUNED}:  # a mode that calibrates
        checks.check_datasets_cache()
    if args.chart is not None:
        make_out_dir(args.chart)
        checks.check_chart(args.chart)  # a text file, --eval-data among them, is not a PNG: it is never replaced
    low, high = EFFECTIVE_BITS_RANGE
    outside = [bits for bits in args.auto_bits if not low <= bits <= high]
    if outside:
        raise UsageError(
            f"--auto-bits must be between {low:g} (every layer int4) and {high:g} (none quantized), got {outside[0]:g}"
        )
    return args


def build_parser() -> ArgumentParser:
    """evaluate.py's flags, in the order --help lists them."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_row_args(parser)
    add_data_args(parser)
    return parser


def add_row_args(parser: argparse.ArgumentParser) -> None:
    """The model, the rows measured, and how the QAT rows fine-tune."""
    parser.add_argument(
        "--model-type",
        metavar="NAME_OR_DIR",
        default=DEFAULT_MODEL,
        help="a local GPT-2 checkpoint directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face Hub) "
        "(default: the bundled model in bundled_model/)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=ALL_MODES,
        default=list(REPORT_MODES),
        metavar="MODE",
        help=f"rows to report, from: {', '.join(ALL_MODES)} ({UNQUANTIZED} is always measured: it is the baseline; "
        f"{FINETUNED} and the -qat rows fine-tune for --qat-steps, minutes each; the -kv rows add a float8 KV cache to "
        f"their mode, the -kv-int8 rows an int8 one) (default: {' '.join(REPORT_MODES)})",
    )
    parser.add_argument(
        "--qat-steps",
        metavar="N",
        type=int,
        default=DEFAULT_QAT_STEPS,
        help="fine-tuning steps of the QAT rows (default: %(default)s)",
    )
    parser.add_argument(
        "--qat-lr",
        metavar="LR",
        type=checks.learning_rate,
        default=DEFAULT_QAT_LR,
        help="peak learning rate of the QAT rows (default: %(default)s)",
    )
    parser.add_argument(
        "--qat-batch-size",
        metavar="N",
        type=int,
        default=8,
        help="windows of n_positions tokens per QAT step (default: %(default)s)",
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The text evaluated and calibrated on, the auto rows' budgets, and what is written besides the table."""
    parser.add_argument(
        "--eval-data", metavar="FILE", default=DEFAULT_EVAL_DATA, help="held-out text file (default: data/heldout.txt)"
    )
    parser.add_argument(
        "--max-tokens", metavar="N", type=int, help="evaluate only the first N held-out tokens (default: all)"
    )
    parser.add_argument(
        "--context", metavar="N", type=int, help="tokens per evaluation window (default: the model's n_positions)"
    )
    parser.add_argument(
        "--num-calibration-samples",
        metavar="N",
        type=int,
        default=64,
        help="text samples to calibrate on (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration-data",
        metavar="NAME_OR_FILE",
        help="cnn_dailymail, or a local .txt/.json/.jsonl file (default: cnn_dailymail, or data/calibration.txt "
        "when the Hugging Face Hub is unreachable)",
    )
    parser.add_argument(
        "--auto-bits",
        nargs="+",
        type=float,
        default=list(DEFAULT_AUTO_BITS),
        metavar="B",
        help=f"the budgets of effective bits of the {AUTO_QUANT_MODE} rows, from {EFFECTIVE_BITS_RANGE[0]:g} to "
        f"{EFFECTIVE_BITS_RANGE[1]:g} (default: {' '.join(f'{bits:g}' for bits in DEFAULT_AUTO_BITS)})",
    )
    parser.add_argument(
        "--chart",
        metavar="PNG",
        nargs="?",
        const=DEFAULT_CHART,
        help=f"also save a chart of perplexity against weight size, to PNG (without one: {DEFAULT_CHART})",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export each uniform mode's twin with exports/onnx_export.py and measure it in ONNX Runtime, at its "
        "default accuracy level (int8 activations in the int8/int4 matmuls) and at float32 math, and the weight-only "
        "modes' ONNX Runtime flavor (exports/onnx_fused.py) at the default level; a -kv-int8 row in that flavor alone, "
        "the one file that stores an int8 KV cache",
    )


def check_sizes(args: argparse.Namespace) -> None:
    """The counts of tokens and samples."""
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (one input and one target), got {args.max_tokens}")
    if args.context is not None and args.context < 1:
        raise UsageError(f"--context must be at least 1, got {args.context}")
    if args.num_calibration_samples < 1:
        raise UsageError(f"--num-calibration-samples must be at least 1, got {args.num_calibration_samples}")


def fine_tuned_modes(modes: Sequence[str]) -> set[str]:
    """The rows that fine-tune: INT4_MAX is calibrated, not trained."""
    return set(modes) & (set(QAT_MODES) - {INT4_MAX})


def check_finetuning_args(args: argparse.Namespace) -> None:
    checks.check_at_least(args, 1, "qat_steps", "qat_batch_size")
    if fine_tuned_modes(args.modes):
        checks.check_finetuning_fits(args.model_type, args.qat_batch_size, "--qat-batch-size")


def check_options_apply(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """An option given for rows that --modes leaves out would do nothing: refused rather than ignored."""
    fine_tuned = fine_tuned_modes(args.modes)
    calibrated = set(args.modes) - {UNQUANTIZED, FINETUNED}
    if args.calibration_data is not None and not calibrated:
        raise UsageError(
            f"--calibration-data needs a quantized mode in --modes: {' '.join(args.modes)} calibrate nothing"
        )
    unused = {
        "auto_bits": AUTO_QUANT_MODE not in args.modes,
        "qat_steps": not fine_tuned,
        "qat_lr": not fine_tuned,
        "qat_batch_size": not fine_tuned,
        "num_calibration_samples": not calibrated,
    }
    ignored = [
        name for name, is_unused in unused.items() if is_unused and getattr(args, name) != parser.get_default(name)
    ]
    if ignored:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in ignored)
        raise UsageError(f"{options} would do nothing for --modes {' '.join(args.modes)}")


def evaluate(
    model_type: str,
    modes: Sequence[str] = REPORT_MODES,
    eval_data: str = DEFAULT_EVAL_DATA,
    max_tokens: int | None = None,
    context: int | None = None,
    num_calibration_samples: int = 64,
    calibration_data: str | None = None,
    auto_bits: Sequence[float] = DEFAULT_AUTO_BITS,
    qat_steps: int = DEFAULT_QAT_STEPS,
    qat_lr: float = DEFAULT_QAT_LR,
    qat_batch_size: int = 8,
    onnx: bool = False,
) -> list[Row]:
    """One row per mode, unquantized first (the baseline), the others in ALL_MODES order, AUTO_QUANT_MODE as a row
    per budget in `auto_bits`. With `onnx`, each of UNQUANTIZED and QUANT_MODES is followed by its ONNX Runtime rows."""
    from measure.perplexity import perplexity
    from measure.twin import load_twin
    from sources.hub import load_hf_model

    unknown = sorted(set(modes) - set(ALL_MODES))
    if unknown:
        raise ValueError(f"Unknown modes {unknown}; supported: {', '.join(ALL_MODES)}")
    measured = [mode for mode in ALL_MODES if mode == UNQUANTIZED or mode in modes]
    row_names = [
        name for mode in measured for name in (auto_row_names(auto_bits) if mode == AUTO_QUANT_MODE else [mode])
    ]

    def row_started(name: str) -> None:
        """A line on stderr as each row starts: the report takes minutes, and each step's bar says only how far
        that step is."""
        print(f"Row {row_names.index(name) + 1} of {len(row_names)}: {name}", file=sys.stderr, flush=True)

    hf_model = load_hf_model(model_type)
    tokens, context = evaluation_tokens(hf_model, model_type, modes, eval_data, max_tokens, context)

    def finetuned(model: GPT2LMHeadModel, mode: str) -> tuple[GPT2LMHeadModel, float]:
        return quantization_aware_training(model, qat_steps, qat_lr, qat_batch_size, mode)

    rows = []
    calibrated = {}  # mode calibrated -> (quantized model, twin, calibration seconds): one serves several rows
    for mode in measured:
        if mode == AUTO_QUANT_MODE:
            rows += auto_rows(
                hf_model, auto_bits, tokens, context, calibration_data, num_calibration_samples, row_started
            )
            continue
        row_started(mode)
        training_seconds = 0.0
        if mode in (UNQUANTIZED, FINETUNED):
            model, calibration_seconds = hf_model, 0.0
            if mode == FINETUNED:
                model, training_seconds = finetuned(hf_model, mode)
            twin = load_twin(model, None)
        else:
            quantized, twin, calibration_seconds = calibrated_twin(
                hf_model, mode, calibrated, calibration_data, num_calibration_samples
            )
            if mode == INT4_WITHOUT_PRE_QUANT_SCALE:
                twin = drop_pre_quant_scale(copy.deepcopy(twin))
            if mode.endswith("-qat"):
                trained, training_seconds = finetuned(quantized, mode)
                twin = load_twin(hf_model, "int4-weight-only", trained)
        start = time.perf_counter()
        ppl = perplexity(twin, tokens, context, desc=f"Evaluating {mode}")
        seconds = time.perf_counter() - start
        rows.append(Row(mode, ppl, weight_bytes(twin), calibration_seconds, seconds, training_seconds=training_seconds))
        if onnx and mode in (UNQUANTIZED, *QUANT_MODES, *LM_HEAD_ROWS, *KV_INT8_ROWS):
            rows += onnx_rows(twin, mode, tokens, context, calibration_seconds)
    return rows


def evaluation_tokens(
    hf_model: GPT2LMHeadModel,
    model_type: str,
    modes: Sequence[str],
    eval_data: str,
    max_tokens: int | None,
    context: int | None,
) -> tuple[torch.Tensor, int]:
    """The held-out tokens [n] and the evaluation window, once the model's config says how wide and long it is."""
    width = hf_model.config.n_embd
    int4_rows = [mode for mode in modes if "int4" in mode or mode == AUTO_QUANT_MODE]
    if int4_rows and width % INT4_BLOCK_SIZE:
        raise ValueError(
            f"{model_type} is {width} wide, not a multiple of int4's blocks of {INT4_BLOCK_SIZE}: leave {int4_rows[0]} "
            "out of --modes"
        )
    context = context or hf_model.config.n_positions
    if context > hf_model.config.n_positions:
        raise ValueError(f"context {context} is longer than the model's n_positions ({hf_model.config.n_positions})")
    tokens = heldout_tokens(eval_data, max_tokens)
    if max_tokens is not None and len(tokens) < max_tokens:
        used = f"{len(tokens):,}"
        print(f"{eval_data} has only {used} tokens, fewer than the {max_tokens:,} asked for: using {used}")
    if len(tokens) < context + 1:
        raise ValueError(f"{eval_data} gives {len(tokens)} tokens: at least context + 1 = {context + 1} are needed")
    return tokens, context


def calibrated_twin(
    hf_model: GPT2LMHeadModel,
    mode: str,
    calibrated: dict[str, tuple[GPT2LMHeadModel, GPT, float]],
    calibration_data: str | None,
    num_calibration_samples: int,
) -> tuple[GPT2LMHeadModel, GPT, float]:
    """A quantized row's model, twin and calibration seconds. The rows of one calibration share it: `calibrated`
    keeps each (the -qat rows and the one without pre_quant_scale start from their mode's)."""
    calibrated_mode = mode.removesuffix("-qat")
    calibrated_mode = "int4-weight-only" if calibrated_mode == INT4_WITHOUT_PRE_QUANT_SCALE else calibrated_mode
    if calibrated_mode not in calibrated:
        algorithm = "max" if calibrated_mode in MAX_CALIBRATED else None
        quant_mode = MAX_CALIBRATED.get(calibrated_mode, calibrated_mode)
        quant_mode, kv_cache = split_kv_cache(quant_mode)
        lm_head_mode = quant_mode.removesuffix(LM_HEAD_SUFFIX) if quant_mode.endswith(LM_HEAD_SUFFIX) else None
        quant_mode = quant_mode.removesuffix(LM_HEAD_SUFFIX)
        calibrated[calibrated_mode] = calibrate(
            hf_model, quant_mode, calibration_data, num_calibration_samples, algorithm, kv_cache, lm_head_mode
        )
    return calibrated[calibrated_mode]


def split_kv_cache(row: str) -> tuple[str, str | None]:
    """(the row without its KV suffix, the KV cache the suffix asks for): "int4-weight-only-kv-int8" gives
    ("int4-weight-only", "int8"); a row without one, (row, None)."""
    for suffix, kv_cache in KV_SUFFIXES.items():
        if row.endswith(suffix):
            return row.removesuffix(suffix), kv_cache
    return row, None


def onnx_rows(twin: GPT, mode: str, tokens: torch.Tensor, context: int, calibration_seconds: float) -> list[Row]:
    """The twin exported by exports/onnx_export.py and run by ONNX Runtime at its default accuracy level and at float32
    math, and for a weight-only mode by exports/onnx_fused.py at the default level; with an int8 KV cache, which only
    the second holds, that one alone. Weight MB counts the format as the twin's row does (the file itself keeps
    float32 where Tripy has float16)."""
    import tempfile

    from exports import onnx_export, onnx_fused, onnx_runtime
    from measure.perplexity import perplexity

    # each file, and the accuracy levels it is measured at with their rows' labels
    files = {}
    if twin.config.kv_cache is None:  # the standard file's cache is float32
        files[onnx_export.export_onnx] = {"int8": "ONNX Runtime", "float32": "ONNX Runtime, float32 math"}
    if twin.config.quant_mode not in ACTIVATION_QUANT_MODES:  # the ONNX Runtime flavor: weight-only, an int8 cache
        files[onnx_fused.export_fused_onnx] = {"int8": "ONNX Runtime flavor"}
    rows = []
    for export, labels in files.items():
        with tempfile.TemporaryDirectory() as onnx_dir:
            export(twin, onnx_dir)
            for math_name, label in labels.items():
                model = onnx_runtime.OnnxGPT(onnx_runtime.session(onnx_dir, math_name))
                start = time.perf_counter()
                with onnx_runtime.torch_threads(1):  # ONNX Runtime on every core, torch's pool idle beside it
                    ppl = perplexity(model, tokens, context, desc=f"Evaluating {mode}, {label}")
                seconds = time.perf_counter() - start
                rows.append(Row(f"{mode}, {label}", ppl, weight_bytes(twin), calibration_seconds, seconds))
    return rows


def quantization_aware_training(
    model: GPT2LMHeadModel, steps: int, lr: float, batch_size: int, desc: str
) -> tuple[GPT2LMHeadModel, float]:
    """A copy of `model` (quantized or not) fine-tuned on the bundled model's training text; and the seconds taken."""
    from training.finetune import finetune, train_tokens

    start = time.perf_counter()
    trained = copy.deepcopy(model)
    finetune(trained, train_tokens(), steps, lr, batch_size, desc=f"Fine-tuning {desc}")
    return trained, time.perf_counter() - start


def heldout_tokens(path: str, max_tokens: int | None = None) -> torch.Tensor:
    """The file's text as GPT-2 tokens [n]; "<|endoftext|>" in it is plain text, not the special token."""
    import torch

    from sources.tokenizer import gpt2_encoding

    with open(path, encoding="utf-8") as file:
        tokens = gpt2_encoding().encode_ordinary(file.read())
    return torch.tensor(tokens[:max_tokens], dtype=torch.long)


def calibrate(
    hf_model: GPT2LMHeadModel,
    quant_mode: str,
    calibration_data: str | None,
    num_samples: int,
    algorithm: str | None = None,
    kv_cache: str | None = None,
    lm_head_mode: str | None = None,
) -> tuple[GPT2LMHeadModel, GPT, float]:
    """Quantizes a copy of the model with ModelOpt (with `kv_cache`, its keys and values too, with `lm_head_mode` its
    output layer); returns it, its twin and the seconds the calibration took."""
    from measure.twin import load_twin
    from quantization import modelopt_quantize  # imports ModelOpt, which takes seconds

    start = time.perf_counter()
    if quant_mode == SMOOTHQUANT_EVERY_LAYER:
        quant_mode, quantized = "int8-smoothquant", smooth_every_layer(hf_model, calibration_data, num_samples)
    else:
        quantized = modelopt_quantize(
            copy.deepcopy(hf_model),
            quant_mode,
            calibration_data,
            num_samples=num_samples,
            algorithm=algorithm,
            kv_cache=kv_cache,
            lm_head_mode=lm_head_mode,
        )
    seconds = time.perf_counter() - start
    return quantized, load_twin(hf_model, quant_mode, quantized, kv_cache=kv_cache, lm_head_mode=lm_head_mode), seconds


def smooth_every_layer(hf_model: GPT2LMHeadModel, calibration_data: str | None, num_samples: int) -> GPT2LMHeadModel:
    """A copy of the model calibrated with int8-smoothquant's ModelOpt config as it is, SmoothQuant's factor left on
    every layer: `modelopt_quantize` without its `unsmooth_after_gelu`."""
    import modelopt.torch.quantization as mtq

    from quantization import create_forward_loop, default_dataset, quant_config
    from sources.tokenizer import gpt2_tokenizer

    quantized = copy.deepcopy(hf_model)
    dataset = default_dataset(calibration_data)
    forward_loop = create_forward_loop(quantized, dataset, gpt2_tokenizer(), "cpu", num_samples=num_samples)
    return mtq.quantize(quantized, quant_config("int8-smoothquant"), forward_loop)


def auto_rows(
    hf_model: GPT2LMHeadModel,
    budgets: Sequence[float],
    tokens: torch.Tensor,
    context: int,
    calibration_data: str | None,
    num_samples: int,
    row_started: Callable[[str], None] = lambda name: None,
) -> list[Row]:
    """A row per budget: one AutoQuantize search, then each budget's mix calibrated and evaluated on its own.

    The search's time is printed, not counted in the rows: it is spent once, for all budgets. `row_started` is told
    each row's name as it starts, the first before the search.
    """
    from measure.perplexity import perplexity
    from measure.twin import load_twin
    from quant.auto_quantize import quantize_with_recipe, search_recipes  # imports ModelOpt, which takes seconds

    rows = []
    names = auto_row_names(budgets)
    row_started(names[0])
    recipes = search_recipes(hf_model, list(budgets), calibration_data, num_samples=num_samples)
    for recipe, mode in zip(recipes, names, strict=True):
        if mode != names[0]:
            row_started(mode)
        start = time.perf_counter()
        quantized = quantize_with_recipe(copy.deepcopy(hf_model), recipe, calibration_data, num_samples=num_samples)
        calibration_seconds = time.perf_counter() - start
        twin = load_twin(hf_model, AUTO_QUANT_MODE, quantized, layer_quant_modes=recipe.layers)
        start = time.perf_counter()
        ppl = perplexity(twin, tokens, context, desc=f"Evaluating {mode}")
        seconds = time.perf_counter() - start
        rows.append(Row(mode, ppl, weight_bytes(twin), calibration_seconds, seconds, recipe.effective_bits))
    return rows


def auto_row_names(budgets: Sequence[float]) -> list[str]:
    return [f"{AUTO_QUANT_MODE} {bits:g} bits" for bits in budgets]


def drop_pre_quant_scale(twin: GPT) -> GPT:
    """Sets every int4 layer's AWQ pre_quant_scale to one, as a loader that ignores it would (in place).

    AWQ multiplies each weight row of input feature i by 1 / s_i before quantizing, and the layer multiplies its
    input by s_i to undo that. Without s the layer computes x @ (W / s): every input feature scaled wrongly.
    """
    import torch

    from reference import Int4Linear

    for module in twin.modules():
        if isinstance(module, Int4Linear):
            with torch.no_grad():
                module.pre_quant_scale.fill_(1.0)
    return twin


def weight_bytes(twin: GPT) -> int:
    """The bytes the deployed model's weights take in the twin's format, counted from its parameters' shapes.

    Quantized linear weights: 1 byte each (int8, float8) or half a byte (int4, two per byte). Everything else is
    float16: embeddings, LayerNorms, biases, unquantized layers and every scale (weight_scale, input_scale,
    pre_quant_scale). lm_head shares wte's matrix (GPT-2 ties them), so an unquantized lm_head adds nothing;
    float8 quantizes lm_head, which then stores its own float8 copy.
    """
    import torch
    from torch import nn

    from reference import Int4Linear, QuantLinear, SmoothQuantLinear

    quantized_weight_bytes = {torch.int8: 1.0, torch.float8_e4m3fn: 1.0}
    total = 0.0
    for module in twin.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if module is twin.lm_head and param_name == "weight" and type(module) is nn.Linear:
                continue  # tied to transformer.wte.weight, counted there
            if param_name == "weight" and isinstance(module, QuantLinear):
                total += param.numel() * quantized_weight_bytes[module.quant_dtype]
            elif param_name == "weight" and isinstance(module, SmoothQuantLinear):
                total += param.numel()  # int8
            elif param_name == "weight" and isinstance(module, Int4Linear):
                total += param.numel() * 0.5  # int4: two per byte
            else:
                total += param.numel() * HIGH_PRECISION_BYTES
    return math.ceil(total)


def format_table(rows: list[Row]) -> str:
    """An aligned text table; the first row is the baseline the changes are measured against."""
    baseline = rows[0]
    header = (
        "mode",
        "perplexity",
        "change vs unquantized",
        "weight MB",
        "size vs unquantized",
        "calibration s",
        "eval s",
    )
    lines = []
    for row in rows:
        lines.append(
            (
                row.mode,
                f"{row.perplexity:.2f}",
                f"{100 * (row.perplexity / baseline.perplexity - 1):+.1f}%",
                f"{row.weight_bytes / 1e6:.2f}",
                f"{row.weight_bytes / baseline.weight_bytes:.2f}x",
                f"{row.calibration_seconds:.1f}",
                f"{row.eval_seconds:.1f}",
            )
        )
    if any(row.training_seconds for row in rows):  # QAT rows: how long the fine-tuning took
        header = (*header, "training s")
        lines = [(*cells, f"{row.training_seconds:.1f}") for cells, row in zip(lines, rows, strict=True)]
    perplexities = {row.mode: row.perplexity for row in rows}
    # What a quantized KV cache costs: each -kv or -kv-int8 row against the same row without it, when both are in
    # the report.
    splits = [split_kv_cache(row.mode) for row in rows]  # (the row without its KV suffix, its KV cache)
    without_kv = [perplexities.get(base) if kv_cache else None for base, kv_cache in splits]
    if any(base is not None for base in without_kv):
        header = (*header, "change vs no KV quant")
        lines = [
            (*cells, "" if base is None else f"{100 * (row.perplexity / base - 1):+.2f}%")
            for cells, row, base in zip(lines, rows, without_kv, strict=True)
        ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        # The mode is text, left-aligned; the numbers are right-aligned so their decimal points line up.
        mode, *numbers = cells
        cells = [mode.ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(numbers, widths[1:], strict=True)]
        return "  ".join(cells).rstrip()  # a row without the last column's number ends without blanks

    return "\n".join(line(cells) for cells in [header, *lines])


def save_chart(rows: list[Row], path: str, title: str = "") -> None:
    """A PNG of quality against weight size: a point per mode, and the auto rows as one curve.

    The left panel shows every row as its perplexity change on a symmetric log scale, so that a broken model (+3%)
    and modes within a fraction of a percent of the baseline are all readable on one axis. With auto rows a second
    panel zooms in on them, between the sizes of the uniform modes they fall among, in perplexity, each mix
    labelled with its effective bits (only there: at the left panel's scale the labels would overprint).
    """
    import matplotlib

    matplotlib.use("Agg")  # draws to files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    auto = sorted((row for row in rows if row.effective_bits is not None), key=lambda row: row.weight_bytes)
    figure, panels = plt.subplots(1, 2 if auto else 1, figsize=(14 if auto else 8, 5.5), squeeze=False)
    overview = panels[0][0]
    baseline = rows[0].perplexity
    draw_rows(overview, rows, auto, lambda row: 100 * (row.perplexity / baseline - 1))
    overview.set_yscale("symlog", linthresh=0.1, linscale=0.5)  # linear within +-0.1%, logarithmic beyond
    overview.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:+g}%"))
    overview.set_ylabel("perplexity change vs unquantized (symmetric log scale)")
    overview.set_title(f"Quality against size: {title}" if title else "Quality against size")
    # A legend rather than text beside each point: modes of nearly the same size and quality would overlap.
    overview.legend(loc="upper right", fontsize=8)
    if auto:
        zoom = panels[0][1]
        draw_rows(zoom, rows, auto, lambda row: row.perplexity, label_auto=True)
        zoom.set_ylabel("perplexity on held-out text (lower is better)")
        near = [row for row in rows if row.effective_bits is not None or row.mode in (UNQUANTIZED, *QUANT_MODES)]
        near = [row for row in near if row.weight_bytes <= rows[0].weight_bytes]  # what is no larger than float16
        low, high = min(r.perplexity for r in near), max(r.perplexity for r in near)
        small, large = min(r.weight_bytes for r in near) / 1e6, max(r.weight_bytes for r in near) / 1e6
        zoom.set_ylim(low - 0.15 * (high - low), high + 0.15 * (high - low))
        zoom.set_xlim(small - 0.05 * (large - small), large + 0.05 * (large - small))
        zoom.set_title("Zoomed in: the AutoQuantize mixes (labelled with their effective bits)")
    for axes in panels[0]:
        axes.set_xlabel("weight size (MB, float16 where not quantized)")
        axes.margins(x=0.2, y=0.2)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    with output_file(path, "--chart", replace=True) as temp:  # an earlier chart is replaced whole, never half
        figure.savefig(temp, dpi=100)
    plt.close(figure)


def draw_rows(axes, rows: list[Row], auto: list[Row], y: Callable[[Row], float], label_auto: bool = False) -> None:
    """A marker per uniform mode and the auto rows as a curve, at (weight MB, y(row)); a dashed line at the baseline."""
    axes.axhline(y(rows[0]), color="gray", linestyle="--", linewidth=0.8)
    uniform = [row for row in rows if row.effective_bits is None]
    for row, marker in zip(uniform, "os^Dv<>p", strict=False):
        label = f"{row.mode}: {row.perplexity:.2f}, {row.weight_bytes / 1e6:.2f} MB"
        axes.scatter(row.weight_bytes / 1e6, y(row), s=60, marker=marker, label=label, zorder=3)
    if auto:
        sizes = [row.weight_bytes / 1e6 for row in auto]
        axes.plot(sizes, [y(row) for row in auto], "-x", color="black", linewidth=1, label="AutoQuantize mixes")
    if label_auto:
        for i, (row, size) in enumerate(zip(auto, sizes, strict=True)):
            axes.annotate(
                f"{row.effective_bits:.2f}",
                (size, y(row)),
                textcoords="offset points",
                xytext=(0, 7 if i % 2 == 0 else -14),  # above and below by turns: neighbours can be close
                ha="center",
                fontsize=8,
            )


if __name__ == "__main__":
    run(main)
