"""The warnings ModelOpt, transformers and torch print during a run though nothing is wrong, silenced in one place,
each with the reason it is harmless. `cli.run` calls `silence()` as every script starts, before those libraries are
imported (some warn on import). Each filter matches one message, so any other warning still shows; one a user can act
on is never listed here. Only the standard library is imported.
"""

import logging
import warnings

# (the start of the message, its category, why it is harmless)
WARNINGS = (
    (
        r"transformers .* is not tested with current version of modelopt",
        UserWarning,
        "ModelOpt's note on import: requirements.txt pins the two, and the tests run them together",
    ),
    (
        r"To copy construct from a tensor",
        UserWarning,
        "torch's remark on ModelOpt's export code, torch.tensor(amax / maxbound): the scale it writes is right "
        "(tests/test_export.py checks every one)",
    ),
    (
        r"`gradient_checkpointing_enable` is deprecated",
        FutureWarning,
        "ModelOpt's AutoQuantize turns on gradient checkpointing by transformers' old name; quant/auto_quantize.py "
        "turns it off after the search",
    ),
    (
        r"Received custom quantization formats",
        UserWarning,
        "AutoQuantize says results with formats of one's own 'may not be optimal': they are this example's modes",
    ),
    (
        r"AutoQuantize: Huggingface model detected",
        UserWarning,
        "AutoQuantize announces the gradient checkpointing above",
    ),
    (
        r"get_auto_quantize_config: returned config uses",
        UserWarning,
        "it says the config it returns calibrates with max only: quant/auto_quantize.py reads it for its formats only",
    ),
    (
        r"lm_head is not calibrated, skip smoothing",
        UserWarning,
        "SmoothQuant names the linear it leaves alone: lm_head, which int8-smoothquant does not quantize",
    ),
)
# (the logger, the start of the message, why it is harmless): log records, not Python warnings.
LOG_RECORDS = (
    (
        "transformers.configuration_utils",
        "`torch_dtype` is deprecated",
        "ModelOpt's export reads config.torch_dtype, transformers' old name for config.dtype; it reads the right dtype",
    ),
    (
        "modelopt.torch.export.quant_utils",
        "Tied weight (declared): dropping 1 alias key(s) for 'lm_head.weight'",
        "an unquantized lm_head is GPT-2's tied copy of the embedding: the export stores it once, as GPT-2 does",
    ),
    (
        "modelopt.torch.export.quant_utils",
        "Skipping name-based dedup of 'lm_head.weight'",
        "float8 quantizes lm_head but not the embedding it is tied to, so the export keeps both: docs/export.md, "
        "an untied lm_head in float8",
    ),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence() -> None:
    """Installs the filters of WARNINGS and LOG_RECORDS (once, however often it is called)."""
    for message, category, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger_name, start, _ in LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(old, _DropMessage) and old.start == start for old in logger.filters):
            logger.addFilter(_DropMessage(start))
