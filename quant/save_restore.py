"""Saving and restoring a quantized GPT-2 in ModelOpt's checkpoint layout (`mto.save`'s): the quantizers, their
calibrated scales and the weights, so that a later run (or qat.py's fine-tuned model) needs no calibration.

example.py imports this module only for --save-quantized and --load-quantized.
"""

import io
import os
import time
from collections import Counter

import modelopt.torch.opt as mto
import torch
from transformers.pytorch_utils import Conv1D

from cli import UsageError
from cli.outputs import output_file
from config import AUTO_QUANT_MODE, LM_HEAD_MODES, QUANT_MODES, quant_mode_of
from quant.lm_head import lm_head_mode_of, untie_lm_head
from weight_loader import MAXBOUND


class QuantizedCheckpointError(ValueError):
    """A file that `load_quantized` cannot restore: not a ModelOpt checkpoint, or one for another model or mode."""


def save_quantized(model: torch.nn.Module, path: str) -> None:
    """Writes a quantized (calibrated or QAT-trained) model: what `mto.save` writes, in no more bytes than the model.

    The file holds ModelOpt's state (which quantizers exist, their config: bits, axis, blocks, and how they were
    calibrated) and the model's state dict: the weights and every quantizer's buffers (amax, AWQ's pre_quant_scale).
    mto.save would store every weight in float32, twice the bundled model's float16 checkpoint. Here
    - each int8 or int4 layer's weights are stored as their integers, one int8 each (under "quantized_weights"): what
      its quantizer rounds them to, which restored as integer * amax / maxbound round to the same integers again;
    - every other weight in float16 where that is exact (all of the bundled model's), in float32 where it is not;
    - the quantizers' buffers as they are: the scales must not move.
    """
    state = model.state_dict()
    shared = Counter(tensor.data_ptr() for tensor in state.values())  # lm_head.weight is wte's
    quantized_weights = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled or shared[module.weight.data_ptr()] > 1:
            continue  # a weight tied to another stays whole: the embedding is not quantized
        mode = quant_mode_of(quantizer.num_bits, bool(quantizer.block_sizes), module.input_quantizer.is_enabled)
        if mode in ("int8-weight-only", "int4-weight-only", "int8-smoothquant"):
            quantized_weights[f"{name}.weight"] = integer_weights(module, mode)
    halves = {}  # one float16 copy per tensor: tied weights stay one tensor in the file
    weights = {}
    for key, tensor in state.items():
        if key in quantized_weights:
            continue
        exact_in_float16 = tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor)
        if exact_in_float16 and "_quantizer." not in key:
            tensor = halves.setdefault(tensor.data_ptr(), tensor.half())
        weights[key] = tensor
    checkpoint = {"modelopt_state": mto.modelopt_state(model), "model_state_dict": weights}
    # Serialized in memory, then written by Python: a failed write (a full disk) is an OSError that says why, where
    # torch's own writer stops at a short write with "unexpected pos".
    buffer = io.BytesIO()
    torch.save({**checkpoint, "quantized_weights": quantized_weights}, buffer)
    with open(path, "wb") as file:
        file.write(buffer.getbuffer())


def integer_weights(module: torch.nn.Module, quant_mode: str) -> torch.Tensor:
    """The integers an int8 or int4 layer's weight quantizer rounds its weight to, as int8 [amax rows, in or 128]."""
    quantizer = module.weight_quantizer
    scale = quantizer.amax.float().reshape(-1, 1) / MAXBOUND[quant_mode]  # [out, 1] (int8) or [out * in / 128, 1]
    with torch.no_grad():
        fake_quantized = quantizer(module.weight.float())  # ModelOpt's own rounding: integer * scale
    return torch.round(fake_quantized.reshape(len(scale), -1) / scale).to(torch.int8)


def dequantized_weights(model: torch.nn.Module, quantized_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights `integer_weights` stored, as integer * scale in each layer's shape, read with the scales of
    `model`'s quantizers (already restored)."""
    weights = {}
    for key, integers in quantized_weights.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        quantizer = module.weight_quantizer
        mode = quant_mode_of(quantizer.num_bits, bool(quantizer.block_sizes), module.input_quantizer.is_enabled)
        scale = quantizer.amax.float().reshape(-1, 1) / MAXBOUND[mode]
        weights[key] = (integers.float() * scale).reshape(module.weight.shape)
    return weights


def load_quantized(model: torch.nn.Module, path: str, quant_mode: str | None = None) -> tuple[torch.nn.Module, str]:
    """Restores a model written by `save_quantized` onto `model`, an unquantized GPT-2 of the same shape, with
    `mto.restore`, and returns it with its quantization mode: no calibration, the saved weights and scales as they
    were. The mode is one of QUANT_MODES, or AUTO_QUANT_MODE for a per-layer mix that AutoQuantize made (from a
    search or a recipe): `recipe_from_model` of the returned model then gives each layer's format. With
    `quant_mode`, the file must hold that mode. Raises QuantizedCheckpointError for a file that is not a ModelOpt
    checkpoint, holds no quantized model, or was saved for a model of another shape or another mode.

    The checks read the file before ModelOpt does, so that a wrong file is one clear message, not a traceback from
    deep in `load_state_dict`. A GPT-2 with other weights but the same shape is accepted: the file's weights replace
    them (that is how a QAT-trained model is restored onto the model it started from).
    """
    try:
        # weights_only (torch's default) as mto.restore loads it: a ModelOpt state is tensors and plain values.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, ...) for a foreign file
        # The first line of torch's message is enough to tell a truncated file from a foreign one; the rest is advice
        # about weights_only, which does not apply to a file that mto.save did not write.
        message = str(error) or type(error).__name__
        reason = message.splitlines()[0].split(". ")[0]
        raise QuantizedCheckpointError(
            f"{path} is not a ModelOpt checkpoint written by mto.save (torch.load: {reason})"
        ) from None
    if not isinstance(checkpoint, dict) or not {"modelopt_state", "model_state_dict"} <= set(checkpoint):
        raise QuantizedCheckpointError(
            f"{path} is not a ModelOpt checkpoint written by mto.save (no modelopt_state and model_state_dict in it)"
        )
    try:
        saved_mode = _saved_quant_mode(checkpoint["modelopt_state"], path)
    except (KeyError, TypeError, AttributeError, IndexError) as error:  # a state edited, or from another tool
        raise QuantizedCheckpointError(
            f"{path} holds a ModelOpt state of another layout than mto.save writes ({type(error).__name__}: {error})"
        ) from None
    saved = checkpoint["model_state_dict"]
    quantized_weights = checkpoint.get("quantized_weights", {})  # none in a file mto.save wrote itself
    tensors = [*saved.values(), *quantized_weights.values()] if isinstance(saved, dict) else []
    if not isinstance(saved, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise QuantizedCheckpointError(f"{path}: its model_state_dict is not a dictionary of tensors")
    if quant_mode is not None and quant_mode != saved_mode:
        raise QuantizedCheckpointError(f"{path} holds a model quantized in {saved_mode}, not {quant_mode}")
    for name, shape in _quantized_shapes(model).items():
        if name in quantized_weights and quantized_weights[name].numel() == torch.Size(shape).numel():
            continue
        if name not in saved or list(saved[name].shape) != shape:
            found = "missing" if name not in saved else f"shape {list(saved[name].shape)}"
            raise QuantizedCheckpointError(
                f"{path} was saved for another model: its {name} is {found}, the model's is {shape}"
            )
    if _saved_lm_head_mode(checkpoint["modelopt_state"]) is not None:
        untie_lm_head(model)  # saved apart from wte (--lm-head): tied, restoring it would overwrite the embedding
    # As mto.restore does: the quantizers first, then the weights, the integer ones once their scales are in place.
    model = mto.restore_from_modelopt_state(model, checkpoint["modelopt_state"])
    model.load_state_dict(saved, strict=False)
    model.load_state_dict({**saved, **dequantized_weights(model, quantized_weights)})  # strict: every tensor is there
    return model, saved_mode


def _saved_quant_mode(modelopt_state: dict, path: str) -> str:
    """The mode of a saved ModelOpt state: AUTO_QUANT_MODE for a model that mtq.auto_quantize quantized, otherwise the
    one mode its weight quantizers' bits and blocks show (as weight_loader does)."""
    entries = modelopt_state.get("modelopt_state_dict", [])
    # ModelOpt records mtq.quantize as its "quantize" mode and mtq.auto_quantize (a search, or quantize_with_recipe)
    # as "auto_quantize" (modelopt/torch/quantization/mode.py), whose calibration leaves no mode of its own.
    applied = {mode_name for mode_name, _ in entries}
    if not applied & {"quantize", "auto_quantize"}:
        raise QuantizedCheckpointError(
            f"{path} holds no quantized model (its ModelOpt state has no quantize or auto_quantize mode)"
        )
    # The output layer's own format (--lm-head) is not the mode's: float8's lm_head is float8, the mode's anyway.
    found = {mode for name, mode in _saved_layer_modes(modelopt_state).items() if name != "lm_head"}
    if None not in found:
        # A mix stays a mix even when it happens to hold one format: lm_head stays out of it, unlike float8's.
        if "auto_quantize" in applied:
            return AUTO_QUANT_MODE
        if len(found) == 1:
            return found.pop()
    raise QuantizedCheckpointError(
        f"{path} holds a model quantized in none of this example's modes ({', '.join(QUANT_MODES)}, "
        f"or a per-layer mix of them: {AUTO_QUANT_MODE})"
    )


def _saved_layer_modes(modelopt_state: dict) -> dict[str, str | None]:
    """Each quantized linear layer of a saved ModelOpt state, by name, and its mode as its weight quantizer's bits and
    blocks and its input quantizer show it (as weight_loader does), None for a format of none of QUANT_MODES."""
    # The last entry (calibration updates it) describes the quantizers as they were saved.
    quantizers = modelopt_state["modelopt_state_dict"][-1][1]["metadata"]["quantizer_state"]
    return {
        name.removesuffix(".weight_quantizer"): quant_mode_of(
            state["_num_bits"],
            bool(state["_block_sizes"]),
            not quantizers[name.replace(".weight_quantizer", ".input_quantizer")]["_disabled"],
        )
        for name, state in quantizers.items()
        if name.endswith(".weight_quantizer") and not state["_disabled"]
    }


def _saved_lm_head_mode(modelopt_state: dict) -> str | None:
    """The format of a saved output layer quantized apart from the mode (--lm-head), as `lm_head_mode_of` reads it
    from a model: one of LM_HEAD_MODES, or None."""
    mode = _saved_layer_modes(modelopt_state).get("lm_head")
    return mode if mode in LM_HEAD_MODES else None


def _quantized_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The shape of each tensor of the unquantized model once ModelOpt has quantized it: GPT-2's Conv1D weights
    [in, out] become QuantLinear weights [out, in]."""
    shapes = {}
    for module_name, module in model.named_modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            transposed = isinstance(module, Conv1D) and name == "weight"
            prefix = f"{module_name}." if module_name else ""
            shapes[prefix + name] = list(tensor.shape)[::-1] if transposed else list(tensor.shape)
    return {name: shape for name, shape in shapes.items() if name in model.state_dict()}


def restore_step(
    hf_model: torch.nn.Module, path: str, quant_mode: str | None
) -> tuple[torch.nn.Module, str, dict[str, str | None] | None]:
    """example.py's --load-quantized: restores a model saved with mto.save onto `hf_model` (no calibration); returns
    it, its quant mode, and for an AutoQuantize mix each layer's format (printed as the search prints it), otherwise
    None. A file it cannot restore is a UsageError."""
    from quant import auto_quantize as autoquant
    from quant.kv_cache import described_with_kv_cache, kv_cache_of

    start = time.perf_counter()
    try:
        hf_model, quant_mode = load_quantized(hf_model, path, quant_mode)
    except QuantizedCheckpointError as error:
        raise UsageError(f"--load-quantized: {error}") from None
    kv_cache = kv_cache_of(hf_model)  # the K and V quantizers it was calibrated with, if any (quant/kv_cache.py)
    lm_head_mode = lm_head_mode_of(hf_model)
    described = described_with_kv_cache(quant_mode, kv_cache)
    described += "" if lm_head_mode is None else f" with an {lm_head_mode} output layer"
    print(f"Restored {described} from {path} in {time.perf_counter() - start:.1f} s (no calibration)")
    if quant_mode != AUTO_QUANT_MODE:
        return hf_model, quant_mode, None
    recipe = autoquant.recipe_from_model(hf_model)  # the formats as the restored quantizers are
    print(autoquant.format_recipe(recipe))
    return hf_model, quant_mode, recipe.layers


def save_step(hf_model: torch.nn.Module, path: str) -> None:
    """example.py's --save-quantized: `save_quantized` into a new file that becomes `path` whole, and only if nothing
    is there by then (cli/outputs.py); a file it cannot write is a UsageError."""
    with output_file(path, "--save-quantized") as temp:
        save_quantized(hf_model, temp)
    print(f"Saved the quantized model to {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
