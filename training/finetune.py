"""What train.py and quantization-aware training (qat.py, evaluate.py) share: the bundled model's corpus, its loss,
its learning-rate schedule, and a short fine-tuning loop.

The corpus is the prose in the docstrings of the Python standard library (PSF license), read offline from the
stdlib source directory. About 5% of the modules are held out for validation (data/heldout.txt).
"""

import ast
import functools
import hashlib
import math
import re
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GPT2LMHeadModel

from sources.hub import HELDOUT_PATH
from sources.tokenizer import gpt2_encoding

# Test suites, IDLE, bundled wheels, code-page tables and demo scripts: code and boilerplate rather than prose.
SKIP_DIRS = {
    "__phello__",
    "__pycache__",
    "encodings",
    "ensurepip",
    "idlelib",
    "lib-dynload",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "test",
    "tests",
    "turtledemo",
}
HELDOUT_PERCENT = 5


def stdlib_docstrings() -> dict[str, list[str]]:
    """Module, class and function docstrings of each stdlib source file, keyed by its path relative to the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docstrings = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP_DIRS.intersection(relative.parts[:-1]) or relative.parts[0].startswith("config-"):
            continue
        tree = ast.parse(path.read_bytes())
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        # clean=True runs inspect.cleandoc: strips the indentation that the source code adds.
        found = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, nodes))
        prose_texts = (prose(text) for text in found if text)
        docstrings[relative.as_posix()] = [text for text in prose_texts if text]
    return docstrings


def prose(docstring: str) -> str:
    """The docstring's paragraphs of prose, each on one line with single spaces, separated by blank lines.

    Indented paragraphs (code, doctests, option lists) are dropped, and runs of spaces are folded: GPT-2's BPE makes
    each run of spaces a token of its own, and a small model trained on them learns to print whitespace.
    """
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        words = paragraph.split()
        if len(words) >= 4:  # headings and labels such as "Parameters:" are not sentences
            paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs)


def is_heldout(relative_path: str) -> bool:
    # sha256 rather than hash(), which is salted per process: the split must be the same on every run.
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def split_corpus(docstrings: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Train and validation docstrings, split by file, without repeats and with no docstring in both."""
    train = {}  # a dict as an ordered set
    for path, texts in docstrings.items():
        if not is_heldout(path):
            train.update(dict.fromkeys(texts))
    validation = {}
    for path, texts in docstrings.items():
        if is_heldout(path):
            validation.update(dict.fromkeys(text for text in texts if text not in train))
    return list(train), list(validation)


def lm_loss(model: GPT2LMHeadModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; the softmax over 50257 tokens is computed in float32."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@functools.cache  # reading and tokenizing the standard library takes seconds; several fine-tunings share it
def train_tokens() -> torch.Tensor:
    """The training split as one token stream [n], docstrings separated by a blank line, as train.py trains on."""
    train_texts, _ = split_corpus(stdlib_docstrings())
    return torch.tensor(gpt2_encoding().encode_ordinary("\n\n".join(train_texts)))


def validation_tokens() -> torch.Tensor:
    """data/heldout.txt (the held-out split train.py wrote) as one token stream [n]."""
    return torch.tensor(gpt2_encoding().encode_ordinary(HELDOUT_PATH.read_text()))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (including the tied embedding), not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class TrainingDivergedError(ValueError):
    """The loss or a weight became inf or NaN: the learning rate was too high for the model."""


def check_finite(model: torch.nn.Module, loss: float, step: int, steps: int) -> None:
    """Stops training the step it diverges, so that a model of NaNs is never saved. The weights are checked at the
    last step only: a NaN weight makes the next step's loss NaN, except after the last step."""
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"the loss became {loss} at step {step + 1} of {steps}")
    if step + 1 == steps and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingDivergedError(f"the weights became inf or NaN at step {steps}, the last")


def finetune(
    model: GPT2LMHeadModel,
    tokens: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "Fine-tuning",
) -> list[float]:
    """Trains `model` in place for `steps` AdamW steps on random windows of `tokens`, all but its embeddings, with
    train.py's warmup and cosine schedule from `lr`; returns each step's loss. Raises TrainingDivergedError when
    the learning rate is too high for the model.

    Quantization-aware training is this loop run on a model that ModelOpt has quantized: each forward pass
    quantizes and dequantizes the weights with the calibrated scales, so the loss is the deployed model's loss, and
    the gradient passes the rounding unchanged (the straight-through estimator) to the float32 weights underneath.
    It runs in float32: the quantizers' rounding is what is being trained against, not bfloat16's.
    """
    context = model.config.n_positions
    torch.manual_seed(seed)  # dropout's masks: the same seed gives the same fine-tuned model
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    # The embeddings stay as they are: the 50257-row token table is most of the parameters and of the backward
    # pass's work, and no mode quantizes it (float8 quantizes lm_head, which shares it, with its own calibrated scale).
    for embedding in (model.transformer.wte, model.transformer.wpe):
        embedding.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        starts = torch.randint(len(tokens) - context - 1, (batch_size, 1), generator=generator)
        windows = tokens[starts + offsets]  # [batch, context + 1]
        loss = lm_loss(model, windows[:, :-1], windows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        check_finite(model, losses[-1], step, steps)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
