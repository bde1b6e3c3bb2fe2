"""Perplexity: how surprised a language model is by text it has not seen; lower is better.

Shared by the quality report (evaluate.py) and training (train.py), so both measure exactly the same thing.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

EVAL_BATCH_SIZE = 4  # windows per forward pass
MAX_EXP_ARGUMENT = 709.0  # math.exp overflows a float above about 709.78


@torch.no_grad()
def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, context: int, desc: str = "Evaluating"
) -> float:
    """exp of the mean next-token cross-entropy over non-overlapping windows of `context` tokens (tail dropped).

    `model` maps token ids [batch, seq] to logits [batch, seq, vocab]: the twin, or a wrapped Hugging Face model.
    """
    num_windows = (len(tokens) - 1) // context
    inputs = tokens[: num_windows * context].view(num_windows, context)  # [windows, context]
    targets = tokens[1 : num_windows * context + 1].view(num_windows, context)  # the next token at each position
    total_loss = 0.0
    with tqdm(total=num_windows * context, desc=desc, unit="token", unit_scale=True) as progress:
        for start in range(0, num_windows, EVAL_BATCH_SIZE):
            batch = slice(start, start + EVAL_BATCH_SIZE)
            logits = model(inputs[batch])  # [batch, context, vocab]
            total_loss += F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), reduction="sum").item()
            progress.update(inputs[batch].numel())
    mean_loss = total_loss / (num_windows * context)
    return math.exp(mean_loss) if mean_loss < MAX_EXP_ARGUMENT else math.inf  # a model gone wrong: no OverflowError
