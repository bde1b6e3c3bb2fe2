"""The names ModelOpt's unified checkpoint gives the modes (hf_quant_config.json's quant_algo and
kv_cache_quant_algo), and what an export's hf_quant_config.json says, read with the standard library alone: so that
example.py's command line is checked against an export (cli/example_args.py) before torch is imported.
exports/modelopt_hf.py reads the rest of the format.
"""

import json
import os

QUANT_ALGOS = {
    "W8A16": "int8-weight-only",
    "W4A16_AWQ": "int4-weight-only",
    "FP8": "float8",
    "W8A8_SQ_PER_CHANNEL": "int8-smoothquant",
}
KV_CACHE_QUANT_ALGOS = {"FP8": "float8"}  # kv_cache_quant_algo -> config.KV_CACHE_MODES


def export_modes(export_dir: str) -> tuple[str | None, str | None, str | None]:
    """(quant_algo, its mode, the KV cache's mode) as the export's hf_quant_config.json names them; all None when the
    file is not one ModelOpt wrote in a form this example reads (modelopt_hf.read_export then says what is wrong)."""
    try:
        with open(os.path.join(export_dir, "hf_quant_config.json"), encoding="utf-8") as file:
            hf_quant_config = json.load(file)
        producer, quantization = hf_quant_config.get("producer"), hf_quant_config.get("quantization")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):  # AttributeError: not an object
        return None, None, None
    if not isinstance(producer, dict) or producer.get("name") != "modelopt" or not isinstance(quantization, dict):
        return None, None, None
    quant_algo, kv_cache_quant_algo = quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo")
    quant_mode = QUANT_ALGOS.get(quant_algo) if isinstance(quant_algo, str) else None
    kv_cache = KV_CACHE_QUANT_ALGOS.get(kv_cache_quant_algo) if isinstance(kv_cache_quant_algo, str) else None
    return quant_algo if quant_mode else None, quant_mode, kv_cache
