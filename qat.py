"""Quantization-aware training (QAT): fine-tune a GPT-2 that ModelOpt has quantized, with its quantizers in place.

Post-training quantization (PTQ, quantization.py) calibrates scales and leaves the weights as they were trained.
QAT then trains on: every forward pass quantizes the weights with those scales, so the loss is the quantized
model's loss, and the weights move to where rounding costs least. The result is saved as example.py's
--save-quantized saves, and the rest of the pipeline takes it as it takes a calibrated model:

    python qat.py                  # int4, max calibration, 100 steps on the bundled model: out/qat-int4-max.pt
    python example.py --model-type bundled_model --load-quantized out/qat-int4-max.pt

It trains on the bundled model's own corpus (training/finetune.py) for 100 steps by default, a tenth of the 1,000 that
trained the bundled model, and reports the held-out perplexity of the deployed arithmetic (the PyTorch twin) before
and after.
"""

import argparse
import copy
import os
import time

from cli import OUT_DIR, ArgumentParser, UsageError, checks, make_out_dir, run
from cli.outputs import output_file
from config import QUANT_MODES
from sources.hub import BUNDLED_MODEL_DIR

BUNDLED_TRAINING_STEPS = 1000  # train.py's default: the steps that trained bundled_model/
# train.py's learning rate at the end of its schedule (a tenth of its 2e-3 peak): fine-tuning starts where it ended.
DEFAULT_LR = 2e-4


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()

    import torch  # the arguments are good: now the imports that take seconds

    from measure.perplexity import perplexity
    from measure.twin import load_twin
    from quant.save_restore import save_quantized
    from quantization import modelopt_quantize
    from sources.hub import load_hf_model
    from training.finetune import HELDOUT_PATH, TrainingDivergedError, finetune, train_tokens, validation_tokens

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        unquantized = load_hf_model(args.model_type)
    except (ValueError, OSError) as error:  # not a GPT-2 checkpoint
        raise UsageError(str(error)) from None
    context = unquantized.config.n_positions
    validation = validation_tokens()
    tokens = train_tokens()
    print(f"corpus: {len(tokens):,} training tokens; {len(validation):,} validation tokens in {HELDOUT_PATH.name}")

    def deployed_perplexity(quantized: torch.nn.Module, desc: str) -> float:
        """Perplexity of the twin built from the quantized model: the arithmetic Tripy runs."""
        return perplexity(load_twin(unquantized, args.quant_mode, quantized), validation, context, desc=desc)

    algorithm = None if args.calibration == "default" else args.calibration
    try:
        model = modelopt_quantize(
            copy.deepcopy(unquantized),
            args.quant_mode,
            args.calibration_data,
            num_samples=args.num_calibration_samples,
            algorithm=algorithm,
        )
    except (ValueError, OSError) as error:  # calibration data that cannot be read
        raise UsageError(str(error)) from None
    ptq = deployed_perplexity(model, "Evaluating PTQ")
    print(f"PTQ: {args.quant_mode} perplexity {ptq:.2f}")

    start = time.time()
    try:
        losses = finetune(model, tokens, args.steps, args.lr, args.batch_size, args.seed, desc="QAT")
    except TrainingDivergedError as error:
        raise UsageError(f"--lr {args.lr:g} is too high for this model: {error}; nothing was saved") from None
    minutes = (time.time() - start) / 60
    qat = deployed_perplexity(model, "Evaluating QAT")
    print(f"QAT: {args.steps} steps in {minutes:.1f} min, last loss {losses[-1]:.3f}, perplexity {qat:.2f}")
    with output_file(args.out, "--out") as temp:  # appears whole, and only if no file is there by then
        save_quantized(model, temp)
    print(f"saved {args.out}; total time {(time.time() - started) / 60:.1f} min")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="qat.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="where to save the QAT model (for --load-quantized), a new file (default: "
        f"{OUT_DIR}/qat-MODE-CALIBRATION.pt, such as {default_out('int4-weight-only', 'max')})",
    )
    parser.add_argument(
        "--model-type",
        metavar="NAME_OR_DIR",
        default=BUNDLED_MODEL_DIR,
        help="a local GPT-2 checkpoint directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face Hub) "
        "(default: the bundled model)",
    )
    parser.add_argument(
        "--quant-mode",
        choices=QUANT_MODES,
        default="int4-weight-only",
        help="the mode to quantize in and train with (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration",
        choices=("default", "max"),
        default="max",
        help="default: the mode's own calibration (AWQ for int4); max: each block's largest weight (default: max)",
    )
    parser.add_argument("--calibration-data", metavar="NAME_OR_FILE", help="as example.py's --calibration-data")
    parser.add_argument(
        "--num-calibration-samples",
        metavar="N",
        type=int,
        default=32,
        help="text samples to calibrate on (default: 32)",
    )
    parser.add_argument(
        "--steps",
        metavar="N",
        type=int,
        default=BUNDLED_TRAINING_STEPS // 10,
        help=f"optimizer steps (default: a tenth of the {BUNDLED_TRAINING_STEPS} that trained the bundled model)",
    )
    parser.add_argument(
        "--lr", type=checks.learning_rate, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", metavar="N", type=int, default=8, help="windows of n_positions tokens per step (default: 8)"
    )
    parser.add_argument("--seed", type=checks.seed, default=0, help="0 to 2**64 - 1 (default: 0)")
    args = parser.parse_args(argv)
    checks.check_at_least(args, 1, "steps", "batch_size", "num_calibration_samples")
    checks.check_model_type(args.model_type)
    if args.quant_mode == "int4-weight-only":  # before a Hub model is downloaded
        checks.check_int4_width(args.model_type, "use --quant-mode int8-weight-only or float8")
    if args.calibration_data is not None:
        checks.check_calibration_data(args.calibration_data)
    checks.check_datasets_cache()
    checks.check_finetuning_fits(args.model_type, args.batch_size, "--batch-size")
    if args.out is None:
        args.out = default_out(args.quant_mode, args.calibration)
        make_out_dir(args.out)
    checks.check_output_file(args.out, "--out", new=True)
    return args


def default_out(quant_mode: str, calibration: str) -> str:
    """out/qat-int4-max.pt for int4-weight-only calibrated with max: where the trained model goes unless --out says."""
    return os.path.join(OUT_DIR, f"qat-{quant_mode.removesuffix('-weight-only')}-{calibration}.pt")


if __name__ == "__main__":
    run(main)
