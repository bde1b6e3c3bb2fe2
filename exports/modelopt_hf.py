"""Reads the GPT-2 checkpoints exports/checkpoint.py writes (ModelOpt's unified Hugging Face format), and teaches
transformers to.

    from exports import modelopt_hf  # registers the "modelopt" quantization method with transformers
    model = AutoModelForCausalLM.from_pretrained("out/")

transformers 5.23 has no "modelopt" method: without this module it warns, skips the quantization config and builds a
plain GPT-2 that cannot hold the int8/float8/packed-int4 weights (worse, the square attn.c_proj loads transposed and
unscaled without a word). Here each quantized linear layer becomes a `ModelOptLinear` whose parameters are the
checkpoint's tensors one to one, kept in their stored type, and dequantized on the fly in `forward`.

The format, per quantized layer (in = input features, out = output features, G = group_size):
    quant_algo  mode               weight                            weight_scale  input_scale  pre_quant_scale
    W8A16       int8-weight-only   int8 [out, in]                    [out]         -            -
    W4A16_AWQ   int4-weight-only   uint8 [out / 2, in], two rows/B   [out, in / G] -            [in]
    FP8         float8             float8_e4m3fn [out, in]           []            []           -
    W8A8_SQ_PER_CHANNEL
                int8-smoothquant   int8 [out, in]                    [out]         []           [in]
With a float8 KV cache (kv_cache_quant_algo FP8) each attention layer also holds transformer.h.N.attn.attn.k_scale
and .v_scale ([], amax / 448), the names vLLM's GPT-2 reads, and quantizes the keys and values it attends to with them.
ModelOpt writes weights [out, in] (nn.Linear's layout). GPT-2's own checkpoints, and the loaders written for them
(transformers' Conv1D, vLLM's gpt2.py), hold c_attn/c_proj/c_fc weights transposed, [in, out]; exports/checkpoint.py
writes that layout and records it as `"weight_layout": "conv1d"` in hf_quant_config.json and config.json (missing
means "linear", ModelOpt's own). Scales and lm_head (an nn.Linear in GPT-2 too) are the same in both layouts.
The real value of a weight is stored * scale (int4: per group of G inputs; AWQ's and SmoothQuant's layers compute
(x * pre_quant_scale) @ W^T, SmoothQuant's quantizing x * pre_quant_scale to int8 with input_scale first).
This module is where that format is read: export_loader.load_weights_from_export uses it too.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AttentionInterface, GPT2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from config import LM_HEAD_MODES
from exports.quant_algos import KV_CACHE_QUANT_ALGOS, QUANT_ALGOS
from reference import quantize_dequantize
from sources.hub import check_config

WEIGHT_LAYOUTS = ("linear", "conv1d")  # [out, in] (ModelOpt's), [in, out] (GPT-2's Conv1D)
STORED_DTYPE = {
    "int8-weight-only": torch.int8,
    "int4-weight-only": torch.uint8,
    "float8": torch.float8_e4m3fn,
    "int8-smoothquant": torch.int8,
}
# GPT-2's Conv1D layers, the ones every mode quantizes; lm_head is quantized when the export does not exclude it.
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# What this loader, and so example.py and serve_vllm.py, take as a KV cache (ModelOpt also names INT8 and NVFP4 ones).
KV_CACHE_READ = (
    "this loader reads FP8, the KV cache serving engines such as vLLM store (an int8 KV cache is for ONNX Runtime on "
    "a CPU: --export-onnx DIR --onnx-flavor ort)"
)
DEFAULT_INT4_GROUP_SIZE = 128  # ModelOpt's W4A16_AWQ block; config.json's copy of the config leaves group_size out


class ExportFormatError(ValueError):
    """The directory is not a GPT-2 checkpoint in ModelOpt's unified format that this loader reads."""


@dataclass
class ExportFormat:
    """What hf_quant_config.json (or config.json's quantization_config) says about the tensors."""

    quant_algo: str
    weight_layout: str = "linear"
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    exclude_modules: list[str] = field(default_factory=list)
    kv_cache_quant_algo: str | None = None

    @property
    def quant_mode(self) -> str:
        return QUANT_ALGOS[self.quant_algo]

    @property
    def kv_cache(self) -> str | None:
        """The KV cache's mode (GPTConfig.kv_cache): None or "float8"."""
        return KV_CACHE_QUANT_ALGOS.get(self.kv_cache_quant_algo)

    @property
    def lm_head_mode(self) -> str | None:
        """The output layer's format beside the mode (GPTConfig.lm_head_mode): the mode's own when lm_head is stored
        quantized in int8 or int4 (--lm-head), None when it is tied to wte, or float8's, part of that mode."""
        return self.quant_mode if self.is_quantized("lm_head") and self.quant_mode in LM_HEAD_MODES else None

    def is_quantized(self, layer_name: str) -> bool:
        """Whether a linear layer ("transformer.h.0.attn.c_proj", "lm_head") is stored quantized."""
        if layer_name in self.exclude_modules:
            return False
        return layer_name == "lm_head" or layer_name.endswith(tuple(f".{layer}" for layer in CONV1D_LAYERS))


def export_format(quantization: dict[str, Any], source: str = "the quantization config") -> ExportFormat:
    """Reads hf_quant_config.json's "quantization" section, or config.json's flat `quantization_config`."""
    quant_algo = quantization.get("quant_algo")
    if quant_algo not in QUANT_ALGOS:
        raise ExportFormatError(
            f"{source} has quant_algo {quant_algo!r}; this loader reads "
            + ", ".join(f"{algo} ({mode})" for algo, mode in QUANT_ALGOS.items())
        )
    weight_layout = quantization.get("weight_layout", "linear")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ExportFormatError(f"{source} has weight_layout {weight_layout!r}; expected one of {WEIGHT_LAYOUTS}")
    # config.json names the excluded modules "ignore", hf_quant_config.json "exclude_modules".
    excluded = quantization.get("exclude_modules", quantization.get("ignore")) or []
    if not isinstance(excluded, list) or not all(isinstance(module, str) for module in excluded):
        raise ExportFormatError(f"{source} has exclude_modules {excluded!r}; expected a list of module names")
    group_size = quantization.get("group_size") or DEFAULT_INT4_GROUP_SIZE
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ExportFormatError(f"{source} has group_size {group_size!r}; expected a whole number of input features")
    # config.json describes the KV cache as a scheme, hf_quant_config.json names its algorithm.
    kv_cache_quant_algo = quantization.get("kv_cache_quant_algo")
    if quantization.get("kv_cache_scheme") == {"dynamic": False, "num_bits": 8, "type": "float"}:
        kv_cache_quant_algo = "FP8"
    elif quantization.get("kv_cache_scheme") is not None:
        raise ExportFormatError(f"{source} has kv_cache_scheme {quantization['kv_cache_scheme']!r}; {KV_CACHE_READ}")
    if kv_cache_quant_algo is not None and kv_cache_quant_algo not in KV_CACHE_QUANT_ALGOS:
        raise ExportFormatError(f"{source} has kv_cache_quant_algo {kv_cache_quant_algo!r}; {KV_CACHE_READ}")
    return ExportFormat(quant_algo, weight_layout, group_size, excluded, kv_cache_quant_algo)


def is_modelopt_export(path: str) -> bool:
    """Whether `path` is a directory with ModelOpt's hf_quant_config.json (which the unified format always has)."""
    return os.path.isfile(os.path.join(path, "hf_quant_config.json"))


def read_export(export_dir: str) -> tuple[ExportFormat, GPT2Config]:
    """The format and the GPT-2 config of an export directory; ExportFormatError says what is wrong with it."""
    quant_config_path = os.path.join(export_dir, "hf_quant_config.json")
    config_path = os.path.join(export_dir, "config.json")
    if not is_modelopt_export(export_dir):
        raise ExportFormatError(
            f"{export_dir} is not a ModelOpt export: it has no hf_quant_config.json "
            "(write one with example.py --quant-mode MODE --export-dir DIR)"
        )
    hf_quant_config = _read_json_object(quant_config_path)
    producer, quantization = hf_quant_config.get("producer"), hf_quant_config.get("quantization")
    if not isinstance(producer, dict) or producer.get("name") != "modelopt" or not isinstance(quantization, dict):
        raise ExportFormatError(f"{quant_config_path} was not written by ModelOpt (no producer 'modelopt')")
    fmt = export_format(quantization, quant_config_path)
    if not os.path.isfile(config_path):
        raise ExportFormatError(f"{export_dir} has no config.json")
    config = _read_json_object(config_path)
    if config.get("model_type") != "gpt2":
        raise ExportFormatError(
            f"{config_path} is a {config.get('model_type')!r} model; this loader reads GPT-2 exports"
        )
    try:
        check_config(config, config_path)
        return fmt, GPT2Config.from_pretrained(export_dir)
    except Exception as error:  # transformers' own checks of the fields raise several types
        raise ExportFormatError(" ".join(str(error).split()) or type(error).__name__) from None


def _read_json_object(path: str) -> dict:
    """A JSON file holding an object; ExportFormatError, naming the file, for anything else."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ExportFormatError(f"{path} is not valid JSON ({error}): is the export complete?") from None
    if not isinstance(value, dict):
        raise ExportFormatError(f"{path} holds a JSON {type(value).__name__}, not an object: is it an export's?")
    return value


def expected_tensors(fmt: ExportFormat, config: GPT2Config) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor a GPT-2 export holds: name -> (shape, stored dtype, or None for a high-precision tensor)."""
    embd, tensors = config.n_embd, {}
    tensors["transformer.wte.weight"] = ((config.vocab_size, embd), None)
    tensors["transformer.wpe.weight"] = ((config.n_positions, embd), None)
    layer_norms = [f"transformer.h.{i}.{ln}" for i in range(config.n_layer) for ln in ("ln_1", "ln_2")]
    for name in (*layer_norms, "transformer.ln_f"):
        tensors[f"{name}.weight"] = tensors[f"{name}.bias"] = ((embd,), None)
    inner = config.n_inner or 4 * embd
    features = {"attn.c_attn": (embd, 3 * embd), "attn.c_proj": (embd, embd), "mlp.c_fc": (embd, inner)}
    features["mlp.c_proj"] = (inner, embd)  # (in, out)
    linears = {
        f"transformer.h.{i}.{layer}": (*shape, True) for i in range(config.n_layer) for layer, shape in features.items()
    }
    if fmt.is_quantized("lm_head"):  # otherwise tied to wte, and not in the checkpoint
        linears["lm_head"] = (embd, config.vocab_size, False)
    for name, (in_features, out_features, bias) in linears.items():
        if fmt.is_quantized(name):
            conv1d = fmt.weight_layout == "conv1d" and name != "lm_head"
            layer = quantized_linear_tensors(fmt, in_features, out_features, bias, conv1d)
        else:  # an unquantized Conv1D, as GPT-2 stores it
            layer = {"weight": ((in_features, out_features), None), "bias": ((out_features,), None)}
        tensors.update({f"{name}.{param}": spec for param, spec in layer.items()})
    if fmt.kv_cache:
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.attn.attn.k_scale"] = tensors[f"transformer.h.{i}.attn.attn.v_scale"] = (
                (),
                None,
            )
    return tensors


def quantized_linear_tensors(
    fmt: ExportFormat, in_features: int, out_features: int, bias: bool, conv1d: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """One quantized linear layer's tensors: "weight", "weight_scale", ... -> (shape, stored dtype or None)."""
    mode = fmt.quant_mode
    stored_rows = out_features // 2 if mode == "int4-weight-only" else out_features  # int4: two rows per byte
    weight_shape = (in_features, stored_rows) if conv1d else (stored_rows, in_features)
    tensors = {"weight": (weight_shape, STORED_DTYPE[mode])}
    if bias:
        tensors["bias"] = ((out_features,), None)
    if mode == "int8-weight-only":
        tensors["weight_scale"] = ((out_features,), None)
    elif mode == "int8-smoothquant":
        tensors["weight_scale"], tensors["input_scale"] = ((out_features,), None), ((), None)
        tensors["pre_quant_scale"] = ((in_features,), None)
    elif mode == "float8":
        tensors["weight_scale"] = tensors["input_scale"] = ((), None)
    else:
        tensors["weight_scale"] = ((out_features, in_features // fmt.group_size), None)
        tensors["pre_quant_scale"] = ((in_features,), None)
    return tensors


def safetensors_files(export_dir: str) -> list[str]:
    """The checkpoint's .safetensors files: model.safetensors, or the shards its index lists."""
    index_path = os.path.join(export_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ExportFormatError(f"{index_path} has no weight_map of tensor names to shard files")
        return [os.path.join(export_dir, shard) for shard in sorted(set(weight_map.values()))]
    path = os.path.join(export_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise ExportFormatError(f"{export_dir} has no model.safetensors")
    return [path]


def check_tensors(export_dir: str, fmt: ExportFormat, config: GPT2Config) -> None:
    """Checks the tensor names, shapes and quantized types from the safetensors headers, without reading data."""
    found = {}
    for path in safetensors_files(export_dir):
        try:
            with safe_open(path, "pt") as file:
                for name in file.keys():
                    tensor_slice = file.get_slice(name)
                    found[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except (OSError, SafetensorError) as error:  # a shard missing, a header cut short or not JSON
            raise ExportFormatError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    where = f"{export_dir} ({fmt.quant_algo}, weight_layout {fmt.weight_layout})"
    for name, (shape, dtype) in expected_tensors(fmt, config).items():
        if name not in found:
            raise ExportFormatError(f"{where} is missing the tensor {name}")
        if found[name][0] != shape:
            raise ExportFormatError(f"{where}: {name} has shape {list(found[name][0])}, expected {list(shape)}")
        stored = _safetensors_dtype(dtype) if dtype is not None else None
        if stored is not None and found[name][1] != stored:
            raise ExportFormatError(f"{where}: {name} is {found[name][1]}, expected {stored}")


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}[dtype]


def read_tensors(export_dir: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in safetensors_files(export_dir):
        with safe_open(path, "pt") as file:
            tensors.update({name: file.get_tensor(name) for name in file.keys()})
    return tensors


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's packed int4, uint8 [out / 2, in] (low nibble: row 2i, high nibble: row 2i + 1) -> int8 [out, in]."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).to(torch.int8)  # [out / 2, 2, in]
    nibbles = torch.where(nibbles > 7, nibbles - 16, nibbles)  # two's complement
    return nibbles.reshape(-1, packed.shape[1])


def dequantize_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor, quant_mode: str, conv1d: bool, group_size: int
) -> torch.Tensor:
    """A stored quantized weight (in its layout) -> its real values, float32 [out, in]."""
    if conv1d:
        weight = weight.t()  # [out, in], or for int4 [out / 2, in]
    if quant_mode == "int4-weight-only":
        scale = weight_scale.float().repeat_interleave(group_size, dim=1)  # [out, in]
        return unpack_int4(weight).float() * scale
    if quant_mode in ("int8-weight-only", "int8-smoothquant"):
        return weight.float() * weight_scale.float()[:, None]
    return weight.float() * weight_scale.float()


class ModelOptLinear(nn.Module):
    """A linear layer holding an export's tensors as they are stored (see the table above).

    forward computes what ModelOpt calibrated: float8 quantizes the input per tensor too, int4 first scales it by
    AWQ's pre_quant_scale, int8-smoothquant does both (SmoothQuant's factor, then int8); the weight is dequantized
    on each call, so only its stored form stays in memory.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, fmt: ExportFormat, conv1d: bool, dtype: torch.dtype
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_mode, self.conv1d, self.group_size = fmt.quant_mode, conv1d, fmt.group_size
        for name, (shape, stored_dtype) in quantized_linear_tensors(
            fmt, in_features, out_features, bias, conv1d
        ).items():
            param = nn.Parameter(torch.empty(shape, dtype=stored_dtype or dtype), requires_grad=False)
            self.register_parameter(name, param)
        if not bias:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_mode == "float8":
            x = quantize_dequantize(x, self.input_scale.to(x.dtype), torch.float8_e4m3fn)
        elif self.quant_mode == "int4-weight-only":
            x = x * self.pre_quant_scale.to(x.dtype)
        elif self.quant_mode == "int8-smoothquant":
            x = quantize_dequantize(x * self.pre_quant_scale.to(x.dtype), self.input_scale.to(x.dtype), torch.int8)
        weight = dequantize_weight(self.weight, self.weight_scale, self.quant_mode, self.conv1d, self.group_size)
        out = x @ weight.to(x.dtype).transpose(1, 0)  # [..., out], as the twin computes it
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_mode={self.quant_mode}"


class KVCacheScales(nn.Module):
    """An attention layer's float8 KV-cache scales; as GPT2Attention's child `attn`, named as in vLLM's GPT-2."""

    def __init__(self, dtype: torch.dtype, attn_implementation: str):
        super().__init__()
        self.k_scale = nn.Parameter(torch.empty((), dtype=dtype), requires_grad=False)
        self.v_scale = nn.Parameter(torch.empty((), dtype=dtype), requires_grad=False)
        self.attn_implementation = attn_implementation  # what attends, once the keys and values are rounded


def float8_kv_attention(module: nn.Module, query, key, value, *args: Any, **kwargs: Any):
    """transformers' attention function for a float8 KV cache: the keys and values handed to attention (past and
    new, after the cache update) quantized and dequantized per tensor, where ModelOpt's k/v_bmm_quantizers are."""
    scales = module.attn
    key = quantize_dequantize(key, scales.k_scale.to(key.dtype), torch.float8_e4m3fn)
    value = quantize_dequantize(value, scales.v_scale.to(value.dtype), torch.float8_e4m3fn)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(scales.attn_implementation, eager_attention_forward)
    return attention(module, query, key, value, *args, **kwargs)


FLOAT8_KV_ATTENTION = "modelopt_float8_kv"
AttentionInterface.register(FLOAT8_KV_ATTENTION, float8_kv_attention)


@register_quantization_config("modelopt")
class ModelOptConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` of a ModelOpt export (quant_method "modelopt")."""

    def __init__(
        self,
        quant_algo: str | None = None,
        ignore: list[str] | None = None,
        weight_layout: str = "linear",
        group_size: int | None = None,
        producer: dict | None = None,
        kv_cache_scheme: dict | None = None,
        **kwargs: Any,
    ):
        self.quant_method = "modelopt"
        self.quant_algo = quant_algo
        self.ignore = ignore or []
        self.weight_layout = weight_layout
        self.group_size = group_size
        self.producer = producer
        self.kv_cache_scheme = kv_cache_scheme
        self.format = export_format(self.to_dict(), "config.json's quantization_config")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "format"}


@register_quantizer("modelopt")
class ModelOptHfQuantizer(HfQuantizer):
    """Replaces GPT-2's quantized linear layers with ModelOptLinear on the meta-device model, before the weights load.

    The checkpoint's tensors then map one to one onto the new parameters, and transformers loads each in the
    parameter's type. The export's headers are checked first, so a missing tensor or a wrong shape is one clear error.
    """

    requires_calibration = True  # loads pre-quantized checkpoints only

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        fmt = self.quantization_config.format
        if model.config.model_type != "gpt2":
            raise ExportFormatError(f"the modelopt loader reads GPT-2 exports, not {model.config.model_type!r}")
        checkpoint_files = kwargs.get("checkpoint_files") or []
        if checkpoint_files:
            export_dir = os.path.dirname(checkpoint_files[0])
            if is_modelopt_export(export_dir):
                fmt, _ = read_export(export_dir)  # hf_quant_config.json has group_size; config.json's copy does not
            check_tensors(export_dir, fmt, model.config)
        dtype = model.transformer.wte.weight.dtype
        for name, module in list(model.named_modules()):
            if not (name.startswith("transformer.h.") or name == "lm_head") or not fmt.is_quantized(name):
                continue
            if name == "lm_head":
                in_features, out_features, conv1d = module.in_features, module.out_features, False
            else:  # Conv1D: weight [in, out], nf = out
                (in_features, out_features), conv1d = module.weight.shape, fmt.weight_layout == "conv1d"
            bias = module.bias is not None
            model.set_submodule(name, ModelOptLinear(in_features, out_features, bias, fmt, conv1d, dtype))
        if fmt.kv_cache:
            for block in model.transformer.h:
                block.attn.attn = KVCacheScales(dtype, model.config._attn_implementation)
            model.config._attn_implementation = FLOAT8_KV_ATTENTION
        if fmt.is_quantized("lm_head"):  # float8 or --lm-head store lm_head quantized: it cannot share wte's matrix
            model.config.tie_word_embeddings = False
            model.all_tied_weights_keys.pop("lm_head.weight", None)

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False
