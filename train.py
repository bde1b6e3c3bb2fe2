"""Train the small GPT-2 that ships with the example, on CPU, from text already on the machine.

The corpus is the prose in the docstrings of the Python standard library (PSF license), read offline from the
stdlib source directory. About 5% of the modules are held out for validation; their text is written beside the
model (for bundled_model/, to data/heldout.txt), so later reports can measure perplexity on exactly the same text.
The model is a Hugging Face GPT2LMHeadModel with GPT-2's own vocabulary, saved in float16 so the checkpoint stays
small enough to commit:

    python train.py                                      # writes out/model/ and out/model/heldout.txt
    python train.py --steps 300 --out-dir out/quick      # writes out/quick/ and out/quick/heldout.txt
    python train.py --out-dir bundled_model --overwrite  # replaces bundled_model/ and data/heldout.txt

The corpus, loss and learning-rate schedule are in training/finetune.py, which quantization-aware training (qat.py)
shares.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cli import OUT_DIR, ArgumentParser, UsageError, checks, run
from cli.outputs import output_file, output_folder
from sources.hub import BUNDLED_MODEL_DIR, HELDOUT_PATH

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel

# Only the standard library is imported up here, so that --help and a mistake on the command line answer at once;
# each function imports the torch and transformers code it uses.

DEFAULT_OUT_DIR = os.path.join(OUT_DIR, "model")
INTEGER = {"metavar": "N", "type": int}  # the flags that count something


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch  # the arguments are good: now the imports that take seconds

    from training.finetune import TrainingDivergedError

    started = time.time()
    heldout = heldout_path(args.out_dir)
    train_tokens, validation_tokens, heldout_text = load_corpus(heldout)
    if len(validation_tokens) < args.n_positions + 1:
        raise UsageError(
            f"--n-positions {args.n_positions} is longer than the held-out text ({len(validation_tokens)} tokens): "
            f"at most {len(validation_tokens) - 1}"
        )
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model = build_model(args.n_layer, args.n_head, args.n_embd, args.n_positions, args.dropout)
    print(f"model: {model.num_parameters():,} parameters, {model.config.n_layer} layers, {model.config.n_head} heads,")
    print(f"       n_embd {model.config.n_embd}, n_positions {model.config.n_positions}")
    try:
        train(model, train_tokens, validation_tokens, args, started)
    except TrainingDivergedError as error:
        raise UsageError(f"--lr {args.lr:g} is too high for this model: {error}; nothing was saved") from None
    save(model, args.out_dir, args.overwrite, validation_tokens, heldout_text)
    print(f"total time {(time.time() - started) / 60:.1f} min")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_training_args(args)
    checks.check_fits_in_memory("training a GPT-2 of these sizes and this batch", training_bytes(args))
    if os.path.normpath(args.out_dir) == DEFAULT_OUT_DIR:
        os.makedirs(OUT_DIR, exist_ok=True)  # a fresh clone has no out/; the model's own folder is made as it saves
    checks.check_output_dir(args.out_dir, "--out-dir", args.overwrite)
    if not args.overwrite and heldout_path(args.out_dir) == HELDOUT_PATH:
        raise UsageError(f"--out-dir {args.out_dir} would replace {os.path.relpath(HELDOUT_PATH)}: pass --overwrite")
    return args


def build_parser() -> ArgumentParser:
    """train.py's flags, in the order --help lists them."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_args(parser)
    add_training_args(parser)
    add_model_size_args(parser)
    return parser


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Where the checkpoint goes."""
    parser.add_argument(
        "--out-dir",
        metavar="DIR",
        default=DEFAULT_OUT_DIR,
        help="where to save the checkpoint; a new or empty folder, unless --overwrite (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out-dir be a folder that is not empty, and replace its files of the same names",
    )


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The optimizer, its schedule and its regularization."""
    parser.add_argument(
        "--steps",
        **INTEGER,
        default=1000,
        help="optimizer steps; the LR schedule spans them all (default: %(default)s)",
    )
    parser.add_argument("--seed", type=checks.seed, default=0, help="0 to 2**64 - 1 (default: %(default)s)")
    parser.add_argument(
        "--batch-size", **INTEGER, default=8, help="windows of --n-positions tokens per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=checks.learning_rate,
        default=2e-3,
        help="peak learning rate, above 0 and at most 1 (default: %(default)s)",
    )
    parser.add_argument("--warmup", **INTEGER, default=50, help="warmup steps (default: %(default)s)")
    parser.add_argument(
        "--weight-decay",
        metavar="WD",
        type=checks.finite_float,
        default=0.1,
        help="AdamW's weight decay on matrices, from 0 to 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--dropout",
        metavar="P",
        type=checks.finite_float,
        default=0.1,
        help="the corpus is seen ~7 times: some regularization (default: %(default)s)",
    )


def add_model_size_args(parser: argparse.ArgumentParser) -> None:
    """The GPT-2 trained, and how often the run reports."""
    parser.add_argument("--n-layer", **INTEGER, default=6, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--n-head", **INTEGER, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument(
        "--n-embd",
        **INTEGER,
        default=128,
        help="a multiple of 128: int4 quantizes blocks of 128 (default: %(default)s)",
    )
    parser.add_argument(
        "--n-positions",
        **INTEGER,
        default=256,
        help="the longest sequence, also the training context (default: %(default)s)",
    )
    parser.add_argument(
        "--log-interval", **INTEGER, default=50, help="print the loss every N steps (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-interval",
        **INTEGER,
        default=500,
        help="validation perplexity every N steps, 0 never (default: %(default)s)",
    )


def check_training_args(args: argparse.Namespace) -> None:
    """The counts, the model's sizes and the optimizer's settings, before any memory is taken."""
    checks.check_at_least(args, 1, "steps", "batch_size", "n_layer", "n_head", "log_interval")
    if args.log_interval > args.steps:  # the loss is printed every --log-interval steps: it would never be
        raise UsageError(f"--log-interval ({args.log_interval}) must be at most --steps ({args.steps})")
    if args.n_embd < 128 or args.n_embd % 128:
        raise UsageError(f"--n-embd must be a multiple of 128 (int4's block), got {args.n_embd}")
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    checks.check_at_least(args, 2, "n_positions")
    checks.check_at_least(args, 0, "eval_interval")
    if not 0 <= args.warmup < args.steps:
        raise UsageError(f"--warmup must be from 0 to --steps - 1 ({args.steps - 1}), got {args.warmup}")
    if not 0 <= args.weight_decay <= 1:  # AdamW shrinks weights by lr * weight_decay
        raise UsageError(f"--weight-decay must be from 0 to 1, got {args.weight_decay}")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be from 0 to below 1, got {args.dropout}")


def training_bytes(args: argparse.Namespace) -> int:
    """A floor on the float32 bytes training holds: weights, gradients and AdamW's two moments, and for one batch
    the logits (with their gradient and softmax) and the attention scores of every layer."""
    vocab, width, positions = 50257, args.n_embd, args.n_positions
    weights = (vocab + positions) * width + args.n_layer * 12 * width * width
    logits = 3 * args.batch_size * positions * vocab
    attention = args.n_layer * args.batch_size * args.n_head * positions * positions
    return 4 * (4 * weights + logits + attention)


def heldout_path(out_dir: str) -> Path:
    """data/heldout.txt goes with the bundled model; a model trained elsewhere keeps its held-out text beside it."""
    if Path(out_dir).resolve() == Path(BUNDLED_MODEL_DIR).resolve():
        return HELDOUT_PATH
    return Path(out_dir) / "heldout.txt"


def build_model(n_layer: int, n_head: int, n_embd: int, n_positions: int, dropout: float) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50257,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    config.architectures = ["GPT2LMHeadModel"]
    return GPT2LMHeadModel(config)


def validation_perplexity(model: GPT2LMHeadModel, tokens: torch.Tensor, context: int) -> float:
    """The quality report's perplexity (evaluate.py), of the Hugging Face model in eval mode."""
    from measure.perplexity import perplexity

    model.eval()
    value = perplexity(lambda idx: model(input_ids=idx).logits.float(), tokens, context, desc="Validating")
    model.train()
    return value


def load_corpus(heldout: Path = HELDOUT_PATH) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train and validation tokens, and the validation text that main writes to `heldout` for the quality report."""
    import torch

    from sources.tokenizer import gpt2_encoding
    from training.finetune import split_corpus, stdlib_docstrings

    train_texts, validation_texts = split_corpus(stdlib_docstrings())
    heldout_text = "\n\n".join(validation_texts) + "\n"
    encoding = gpt2_encoding()
    # The training stream has the same layout as data/heldout.txt: docstrings separated by a blank line.
    train_tokens = torch.tensor(encoding.encode_ordinary("\n\n".join(train_texts)))
    validation_tokens = torch.tensor(encoding.encode_ordinary(heldout_text))
    print(f"corpus: {len(train_texts)} train docstrings, {len(train_tokens):,} tokens;", end=" ")
    print(
        f"{len(validation_texts)} validation docstrings, {len(validation_tokens):,} tokens ({os.path.relpath(heldout)})"
    )
    return train_tokens, validation_tokens, heldout_text


def train(
    model: GPT2LMHeadModel,
    train_tokens: torch.Tensor,
    validation_tokens: torch.Tensor,
    args: argparse.Namespace,
    started: float,
) -> None:
    """AdamW on random windows of the token stream, logging the loss and, now and then, validation perplexity."""
    import torch

    from training.finetune import check_finite, learning_rate, lm_loss, param_groups

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), fused=True)

    context = args.n_positions
    generator = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(context + 1)
    tokens_per_step = args.batch_size * context
    loss_sum, interval_start = 0.0, time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        # Random contiguous windows of the token stream.
        starts = torch.randint(len(train_tokens) - context - 1, (args.batch_size, 1), generator=generator)
        windows = train_tokens[starts + offsets]
        # bfloat16 autocast: the 50257-wide output layer dominates the cost and runs ~1.6x faster on CPUs with
        # bfloat16 support; weights, optimizer state and the softmax stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model, windows[:, :-1], windows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = loss.item()
        check_finite(model, step_loss, step, args.steps)

        loss_sum += step_loss
        if (step + 1) % args.log_interval == 0:
            elapsed = time.time() - interval_start
            rate = args.log_interval * tokens_per_step / elapsed
            print(
                f"step {step + 1}/{args.steps}  loss {loss_sum / args.log_interval:.3f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:,.0f} tok/s  {(time.time() - started) / 60:.1f} min",
                flush=True,
            )
            loss_sum, interval_start = 0.0, time.time()
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and step + 1 < args.steps:
            ppl = validation_perplexity(model, validation_tokens, context)
            print(f"step {step + 1}: validation perplexity {ppl:.2f}")
            interval_start = time.time()


def save(
    model: GPT2LMHeadModel, out_dir: str, overwrite: bool, validation_tokens: torch.Tensor, heldout_text: str
) -> None:
    """Saves the checkpoint in float16 with its held-out text (`heldout_path`), and measures it the way consumers
    load it, in float32. Both are written after training, into a folder that becomes `out_dir` whole (cli/outputs.py):
    an interrupted or failed run leaves the pair as it was."""
    import torch
    from transformers import GPT2LMHeadModel

    heldout = heldout_path(out_dir)
    with output_folder(out_dir, "--out-dir", overwrite) as folder:
        # float16 halves the file; the 50257 x n_embd embedding table is most of it.
        model.half().save_pretrained(folder, safe_serialization=True)
        size = sum(path.stat().st_size for path in Path(folder).iterdir())
        saved = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
        ppl = validation_perplexity(saved, validation_tokens, saved.config.n_positions)
        if heldout != HELDOUT_PATH:
            Path(folder, heldout.name).write_text(heldout_text)
    if heldout == HELDOUT_PATH:  # the bundled model's goes to data/
        with output_file(str(HELDOUT_PATH), "--out-dir", replace=True) as temp:
            Path(temp).write_text(heldout_text)
    print(f"validation perplexity {ppl:.2f} (saved checkpoint, float32)")
    print(f"checkpoint {os.path.relpath(out_dir)}: {size:,} bytes")


if __name__ == "__main__":
    run(main)
