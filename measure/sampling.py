"""How the next token is chosen from the logits: shared by both models, so one seed makes the same text on each."""

import torch


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch, 1], sampled from the top_k most likely at `temperature`."""
    if top_k == 1:  # greedy, at any temperature: one op where a step of a small model is a few milliseconds
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is None:
        return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
    # Draw among the k candidates only: a softmax over k values instead of the whole vocabulary.
    top_logits, top_tokens = torch.topk(logits, min(top_k, logits.shape[-1]))  # [batch, k] each
    choice = torch.multinomial(torch.softmax(top_logits, dim=-1), num_samples=1, generator=generator)  # [batch, 1]
    return top_tokens.gather(-1, choice)
