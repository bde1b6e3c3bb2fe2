"""Quantization-aware training (QAT): fine-tune a GPT-2 that ModelOpt has quantized, with its quantizers in place.

Post-training quantization (PTQ, quantization.py) calibrates scales and leaves the weights as they were trained.
QAT then trains on: every forward pass quantizes the weights with those scales, so the loss is the quantized
model's loss, and the weights move to where rounding costs least. The result is saved with ModelOpt's mto.save, and
the rest of the pipeline takes it as it takes a calibrated model:

    python qat.py --out qat-int4-max.pt                        # int4, max calibration, 100 steps on the bundled model
    python example.py --model-type bundled_model --load-quantized qat-int4-max.pt

It trains on the bundled model's own corpus (training.py) for 100 steps by default, a tenth of the 1,000 that
trained the bundled model, and reports the held-out perplexity of the deployed arithmetic (the PyTorch twin) before
and after.
"""

import os
import sys
import time

from cli import ArgumentParser, fail

BUNDLED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled_model")
QUANT_MODES = ("int8-weight-only", "int4-weight-only", "float8")  # config.QUANT_MODES
BUNDLED_TRAINING_STEPS = 1000  # train.py's default: the steps that trained bundled_model/
# train.py's learning rate at the end of its schedule (a tenth of its 2e-3 peak): fine-tuning starts where it ended.
DEFAULT_LR = 2e-4


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()

    import torch  # the arguments are good: now the imports that take seconds

    from evaluate import heldout_tokens, perplexity
    from quantization import modelopt_quantize, save_quantized
    from training import HELDOUT_PATH, finetune, train_tokens
    from weight_loader import load_hf_model, load_twin

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        model = load_hf_model(args.model_type)
    except (ValueError, OSError) as error:
        fail(str(error), "qat.py")
    context = model.config.n_positions
    validation = heldout_tokens(str(HELDOUT_PATH))
    tokens = train_tokens()
    print(f"corpus: {len(tokens):,} training tokens; validation on {os.path.relpath(HELDOUT_PATH)}")

    def deployed_perplexity(quantized: torch.nn.Module) -> float:
        """Perplexity of the twin built from the quantized model: the arithmetic Tripy runs."""
        return perplexity(load_twin(model_copy, args.quant_mode, quantized), validation, context)

    import copy

    model_copy = copy.deepcopy(model)  # the twin's config and unquantized parts come from it
    algorithm = None if args.calibration == "default" else args.calibration
    try:
        modelopt_quantize(model, args.quant_mode, args.calibration_data, num_samples=args.num_calibration_samples,
                          algorithm=algorithm)
    except (ValueError, OSError) as error:
        fail(str(error), "qat.py")
    ptq = deployed_perplexity(model)
    print(f"PTQ: {args.quant_mode} perplexity {ptq:.2f}")

    start = time.time()
    losses = finetune(model, tokens, args.steps, args.lr, args.batch_size, args.seed, desc="QAT")
    minutes = (time.time() - start) / 60
    qat = deployed_perplexity(model)
    print(f"QAT: {args.steps} steps in {minutes:.1f} min, last loss {losses[-1]:.3f}, perplexity {qat:.2f}")
    save_quantized(model, args.out)
    print(f"saved {args.out} (mto.save); total time {(time.time() - started) / 60:.1f} min")


def parse_args(argv: list[str] | None) -> "argparse.Namespace":  # noqa: F821
    parser = ArgumentParser(prog="qat.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", metavar="PATH", required=True, help="where to save the QAT model (mto.save)")
    parser.add_argument("--model-type", metavar="DIR", default=BUNDLED_MODEL_DIR, help="a local GPT-2 checkpoint")
    parser.add_argument("--quant-mode", choices=QUANT_MODES, default="int4-weight-only")
    parser.add_argument(
        "--calibration",
        choices=("default", "max"),
        default="max",
        help="default: the mode's own calibration (AWQ for int4); max: each block's largest weight (default: max)",
    )
    parser.add_argument("--calibration-data", metavar="NAME_OR_FILE", help="as example.py's --calibration-data")
    parser.add_argument("--num-calibration-samples", metavar="N", type=int, default=32)
    parser.add_argument(
        "--steps",
        type=int,
        default=BUNDLED_TRAINING_STEPS // 10,
        help=f"optimizer steps (default: a tenth of the {BUNDLED_TRAINING_STEPS} that trained the bundled model)",
    )
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows of n_positions tokens per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.num_calibration_samples) < 1:
        parser.error("--steps, --batch-size and --num-calibration-samples must be at least 1")
    if args.lr <= 0:
        parser.error(f"--lr must be greater than 0, got {args.lr}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out}: its directory does not exist")
    return args


if __name__ == "__main__":
    main(sys.argv[1:])
