"""Generates from an ONNX folder written by exports/onnx_export.py with optimum's ORTModelForCausalLM, as a Hugging
Face user.

    .venv-optimum/bin/python -m exports.optimum_generate out/onnx-int4 --prompt "The best way to learn" --prompt "Hello"

optimum loads the folder by its path alone (model.onnx, config.json, generation_config.json, the tokenizer) and
generates greedily, several prompts as one left-padded batch: its attention_mask and position_ids go into the graph.
ONNX Runtime runs at float32 math (`session.qdq_matmulnbits_accuracy_level` 1), the level at which the file computes
the twin's logits. Prints each prompt's new text and token ids (`tokens: [...]`), which tests/test_optimum.py compares
with the twin's. optimum-onnx pins transformers below 4.58, so it runs in its own virtual environment (docs/onnx.md).
"""

import argparse
import os

from cli import ArgumentParser, UsageError, run

DEFAULT_PROMPTS = ["The best way to learn something new is", "Hello"]


def main(argv: list[str] | None = None) -> list[list[int]]:
    args = parse_args(argv)
    import onnxruntime as ort
    import optimum.version
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    print(
        f"optimum {optimum.version.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__}"
    )
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    model = ORTModelForCausalLM.from_pretrained(args.onnx_dir, session_options=options, use_io_binding=False)
    tokenizer = AutoTokenizer.from_pretrained(args.onnx_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    output = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,  # never stop early at end-of-text: the twin does not
        pad_token_id=tokenizer.eos_token_id,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
    for prompt, tokens in zip(args.prompt, new_tokens, strict=True):
        print(f"{prompt!r} -> {tokenizer.decode(tokens)!r}")
        print(f"tokens: {tokens}")
    return new_tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", help="a folder written by exports/onnx_export.py (example.py --export-onnx)")
    parser.add_argument("--prompt", action="append", help=f"a prompt; repeat for a batch [default: {DEFAULT_PROMPTS}]")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    args.prompt = args.prompt or DEFAULT_PROMPTS
    if not os.path.isfile(os.path.join(args.onnx_dir, "model.onnx")):
        raise UsageError(f"{args.onnx_dir} has no model.onnx: give a folder written by example.py --export-onnx")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not all(prompt.strip() for prompt in args.prompt):
        raise UsageError("--prompt must not be empty")
    return args


if __name__ == "__main__":
    run(main)
