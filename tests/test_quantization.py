"""The quantized twin against ModelOpt's own quantized model, and the scales against hand-computed ones.

ModelOpt's fake-quantized Hugging Face model is the independent truth: it is what ModelOpt calibrated and what it
would export. The twin (reference.py) holds the weights and scales that weight_loader.py exports for Tripy.
"""

import copy
import re

import pytest
import torch
from helpers import make_gpt2

from config import QUANT_MODES
from measure.twin import load_twin
from quant.lm_head import DEFAULT_CALIBRATION
from quantization import SHIPPED_CALIBRATION_TEXT as CALIBRATION_TEXT
from quantization import create_forward_loop, modelopt_quantize, quant_config
from reference import GPT
from sources.tokenizer import gpt2_tokenizer
from weight_loader import config_from_hf, get_submodule, load_quant_weights_from_hf

MODES = ("int8-weight-only", "int4-weight-only", "float8", "int8-smoothquant")


@pytest.fixture(scope="module")
def hf_model():
    return make_gpt2()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quantized(hf_model):
    """Each mode's ModelOpt-quantized copy of the model, calibrated once for the whole module."""
    return {
        mode: modelopt_quantize(copy.deepcopy(hf_model), mode, CALIBRATION_TEXT, batch_size=4, num_samples=4)
        for mode in MODES
    }


@torch.no_grad()
def test_unquantized_twin_matches_hugging_face(hf_model, tokens):
    twin = load_twin(hf_model)
    torch.testing.assert_close(twin(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8-weight-only", "int4-weight-only"])
@torch.no_grad()
def test_integer_twin_matches_modelopt(hf_model, quantized, tokens, mode):
    """Integer QDQ is exact arithmetic on the same values: only float summation order differs."""
    expected = quantized[mode](tokens).logits
    quantization_effect = (expected - hf_model(tokens).logits).abs().max()
    assert quantization_effect > 1e-2  # the quantization is visible, so the comparison below means something
    torch.testing.assert_close(load_twin(hf_model, mode, quantized[mode])(tokens), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_float8_twin_layers_match_modelopt(hf_model, quantized, tokens):
    """Each FP8 layer of the twin, fed the input ModelOpt's layer saw, gives ModelOpt's output.

    Up to single FP8 rounding steps (see the end-to-end test below) in under 0.1% of the outputs; a wrong scale
    would be off everywhere."""
    seen = layer_inputs_and_outputs(quantized["float8"], tokens)
    twin = load_twin(hf_model, "float8", quantized["float8"])
    assert len(seen) == 4 * 2 + 1  # every block linear and lm_head
    for name, (layer_input, expected) in seen.items():
        difference = (get_submodule(twin, name)(layer_input) - expected).abs()
        assert (difference > 1e-3 * expected.abs().max()).float().mean() < 1e-3, name
        assert difference.max() < 1e-2 * expected.abs().max(), name


@torch.no_grad()
def test_float8_twin_matches_modelopt_end_to_end(tokens):
    """TensorRT divides by the scale, ModelOpt multiplies by its reciprocal: the two can land a value on opposite
    sides of an FP8 rounding boundary, one FP8 step (1/16 to 1/8 of it) apart, and the following layers carry that
    on. So end to end the twin must be an order of magnitude closer to ModelOpt than ModelOpt is to the unquantized
    model, not identical. Milder outliers here: large LayerNorm gains would amplify those single steps."""
    hf_model = make_gpt2(outlier_gain=3.0)
    quantized = modelopt_quantize(copy.deepcopy(hf_model), "float8", CALIBRATION_TEXT, num_samples=4)
    expected = quantized(tokens).logits
    quantization_effect = (expected - hf_model(tokens).logits).abs().max()
    twin_error = (load_twin(hf_model, "float8", quantized)(tokens) - expected).abs().max()
    assert twin_error < 0.1 * quantization_effect


def layer_inputs_and_outputs(model, tokens) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each quantized linear's input and output as `model` computes `tokens`, by the layer's name."""
    seen = {}
    hooks = [
        module.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, module in model.named_modules()
        if hasattr(module, "weight_quantizer") and module.weight_quantizer.is_enabled
    ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return seen


@torch.no_grad()
def test_smoothquant_twin_layers_match_modelopt(hf_model, quantized, tokens):
    """Each W8A8 layer of the twin, fed the input ModelOpt's layer saw, gives ModelOpt's output, up to single int8
    steps of the input: TensorRT (and the twin) divide by the scale, ModelOpt multiplies by its reciprocal, which can
    round a value the other way. A wrong or missing scale or smoothing factor would be off everywhere."""
    seen = layer_inputs_and_outputs(quantized["int8-smoothquant"], tokens)
    twin = load_twin(hf_model, "int8-smoothquant", quantized["int8-smoothquant"])
    assert len(seen) == 4 * 2  # every block linear, not lm_head
    for name, (layer_input, expected) in seen.items():
        difference = (get_submodule(twin, name)(layer_input) - expected).abs()
        assert (difference > 1e-3 * expected.abs().max()).float().mean() < 2e-2, name
        assert difference.max() < 2e-2 * expected.abs().max(), name


@torch.no_grad()
def test_smoothquant_twin_matches_modelopt_end_to_end(hf_model, quantized, tokens):
    """End to end the twin is far closer to ModelOpt's model than ModelOpt's is to its own model with either of the
    smoothing factor or the input quantization dropped: a twin that dropped either would fail here.

    Single int8 rounding steps apart (see the layer test) carry on through the layers, so the bound is relative to
    what quantizing changes: a tenth of it."""
    model = quantized["int8-smoothquant"]
    expected = model(tokens).logits
    quantization_effect = (expected - hf_model(tokens).logits).abs().max()
    twin = load_twin(hf_model, "int8-smoothquant", model)
    bound = 0.1 * quantization_effect
    assert (twin(tokens) - expected).abs().max() < bound

    smoothed_layers = [module for module in twin.modules() if hasattr(module, "pre_quant_scale")]
    for module in smoothed_layers:
        module.pre_quant_scale.data.fill_(1.0)
    assert (twin(tokens) - expected).abs().max() > 10 * bound  # the smoothing factor dropped

    input_quantizers = [module.input_quantizer for module in model.modules() if hasattr(module, "input_quantizer")]
    enabled = [quantizer for quantizer in input_quantizers if quantizer.is_enabled]
    for quantizer in enabled:
        quantizer.disable()  # the smoothing factor still applies (ModelOpt multiplies before it quantizes)
    try:
        assert (model(tokens).logits - expected).abs().max() > 2 * bound  # the input quantization dropped
    finally:
        for quantizer in enabled:
            quantizer.enable()


def test_smoothquant_leaves_the_mlp_c_proj_unsmoothed(quantized):
    """SmoothQuant's factor sits on c_attn, attn.c_proj and c_fc, where vLLM's layout can fold it exactly; the MLP's
    c_proj is plain W8A8 max-calibrated: its weight is the model's own, its input amax the largest input seen."""
    model = quantized["int8-smoothquant"]
    for block in model.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc):
            assert layer.input_quantizer.pre_quant_scale is not None
            assert layer.input_quantizer.amax.item() == pytest.approx(1.0)  # alpha 1: every feature at most 1
        assert torch.equal(block.mlp.c_proj.input_quantizer.pre_quant_scale, torch.ones(4 * 256))
    unsmoothed = quantized["int8-weight-only"].transformer.h[0].mlp.c_proj.weight  # the same weights, max-calibrated
    torch.testing.assert_close(model.transformer.h[0].mlp.c_proj.weight, unsmoothed)


def test_int8_smoothquant_scales_are_amax_over_127(hf_model, quantized):
    layer = quantized["int8-smoothquant"].transformer.h[1].mlp.c_fc
    twin_layer = load_twin(hf_model, "int8-smoothquant", quantized["int8-smoothquant"]).transformer.h[1].mlp.c_fc
    weight = layer.weight.detach()  # [out, in], smoothed
    torch.testing.assert_close(twin_layer.weight_scale.detach(), weight.abs().amax(dim=1) / 127)
    torch.testing.assert_close(twin_layer.input_scale.detach(), layer.input_quantizer.amax.detach().float() / 127)
    torch.testing.assert_close(twin_layer.pre_quant_scale.detach(), layer.input_quantizer.pre_quant_scale.float())


def test_float8_weights_differ_from_modelopt_by_at_most_one_step(hf_model, quantized):
    quant_linear = quantized["float8"].transformer.h[0].mlp.c_fc
    expected = quant_linear.weight_quantizer(quant_linear.weight).detach()
    twin_weight = load_twin(hf_model, "float8", quantized["float8"]).transformer.h[0].mlp.c_fc.dequantized_weight
    # Dequantizing multiplies by amax / 448 here and by 1 / (448 / amax) in ModelOpt: ulps apart everywhere.
    differ = ~torch.isclose(twin_weight, expected, rtol=1e-5, atol=0)
    assert differ.float().mean() < 1e-3
    assert torch.all((twin_weight - expected).abs()[differ] <= expected.abs()[differ] / 8)


@torch.no_grad()
def test_awq_pre_quant_scale_matters_here(hf_model, quantized, tokens):
    """The int4 parity test can only catch a dropped pre_quant_scale if dropping it changes the output a lot."""
    twin = load_twin(hf_model, "int4-weight-only", quantized["int4-weight-only"])
    expected = quantized["int4-weight-only"](tokens).logits
    pre_quant_scales = [module.pre_quant_scale for name, module in twin.named_modules() if name.endswith("c_fc")]
    assert max(scale.max() / scale.min() for scale in pre_quant_scales) > 2  # far from 1: the outliers made AWQ act
    for module in twin.modules():
        if hasattr(module, "pre_quant_scale"):
            module.pre_quant_scale.data.fill_(1.0)
    assert (twin(tokens) - expected).abs().max() > 100 * 1e-4


def test_int8_scales_are_row_amax_over_127(quantized):
    quant_linear = quantized["int8-weight-only"].transformer.h[1].attn.c_attn
    twin_layer = load_twin(quantized["int8-weight-only"], "int8-weight-only", quantized["int8-weight-only"])
    weight = quant_linear.weight.detach()  # [out, in]
    expected = weight.abs().amax(dim=1) / 127  # one scale per output channel
    torch.testing.assert_close(twin_layer.transformer.h[1].attn.c_attn.weight_scale.detach(), expected)


def test_int4_scales_are_block_amax_over_7_in_tripy_layout(hf_model, quantized):
    """Scale [in / 128, out]: entry [b, o] covers weight row o, input features 128 b .. 128 b + 127."""
    quant_linear = quantized["int4-weight-only"].transformer.h[0].mlp.c_proj
    weight = quant_linear.weight.detach()  # [out, in] as ModelOpt holds it, after AWQ's rescaling
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 128, 128)
    expected = (blocks.abs().amax(dim=2) / 7).t()  # [in / 128, out]
    twin = load_twin(hf_model, "int4-weight-only", quantized["int4-weight-only"])
    layer = twin.transformer.h[0].mlp.c_proj
    assert layer.weight.shape == (in_features, out_features)
    torch.testing.assert_close(layer.weight_scale.detach(), expected)
    torch.testing.assert_close(layer.weight.detach(), weight.t())


def test_float8_scales_are_tensor_amax_over_448(hf_model, quantized):
    quant_linear = quantized["float8"].lm_head
    twin = load_twin(hf_model, "float8", quantized["float8"])
    torch.testing.assert_close(twin.lm_head.weight_scale.detach(), quant_linear.weight.detach().abs().max() / 448)
    assert twin.lm_head.input_scale.shape == ()


def enabled_quantizers(model) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if type(module).__name__.endswith("Quantizer") and module.is_enabled
    }


def test_quantizers_only_on_the_linears_tripy_quantizes(quantized):
    block_linears = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    for mode in ("int8-weight-only", "int4-weight-only"):
        names = enabled_quantizers(quantized[mode])
        assert names and all(re.fullmatch(block_linears + r"\.weight_quantizer", name) for name in names)
        assert len(names) == 4 * 2
    names = enabled_quantizers(quantized["float8"])
    linears = rf"({block_linears}|lm_head)\.(weight|input)_quantizer"
    assert all(re.fullmatch(linears, name) for name in names) and len(names) == 2 * (4 * 2 + 1)
    names = enabled_quantizers(quantized["int8-smoothquant"])
    assert all(re.fullmatch(rf"{block_linears}\.(weight|input)_quantizer", name) for name in names)
    assert len(names) == 2 * 4 * 2


def test_calibration_is_deterministic():
    model = make_gpt2(n_embd=128, n_layer=1, n_head=2)
    first = modelopt_quantize(copy.deepcopy(model), "int4-weight-only", CALIBRATION_TEXT, num_samples=4)
    second = modelopt_quantize(copy.deepcopy(model), "int4-weight-only", CALIBRATION_TEXT, num_samples=4)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_quant_mode_lists_the_supported_ones(hf_model):
    with pytest.raises(ValueError, match="int8-weight-only, int4-weight-only, float8, int8-smoothquant"):
        modelopt_quantize(copy.deepcopy(hf_model), "int4", CALIBRATION_TEXT)


def test_loading_a_mode_the_model_was_not_quantized_for_fails(hf_model, quantized):
    twin = GPT(config_from_hf(hf_model, dtype="float32", quant_mode="int8-weight-only"))
    with pytest.raises(ValueError, match="not quantized for int8-weight-only"):
        load_quant_weights_from_hf(twin, None, torch.float32, "int8-weight-only", quantized["float8"])


class TestForwardLoop:
    @pytest.fixture(scope="class")
    def small_model(self):
        return make_gpt2(n_embd=64, n_layer=1, n_head=2, n_positions=32)

    def run(self, model, dataset_name, batch_size, num_samples):
        batches = []
        hook = model.register_forward_pre_hook(lambda module, args: batches.append(tuple(args[0].shape)))
        try:
            create_forward_loop(model, dataset_name, gpt2_tokenizer(), "cpu", batch_size, num_samples)(model)
        finally:
            hook.remove()
        return batches  # [batch, seq] of each call

    def test_runs_exactly_num_samples_in_batches_truncated_to_n_positions(self, small_model):
        shapes = self.run(small_model, CALIBRATION_TEXT, batch_size=4, num_samples=10)
        assert [shape[0] for shape in shapes] == [4, 4, 2]
        assert all(shape[1] <= 32 for shape in shapes)

    def test_json_and_jsonl_text_field(self, small_model, tmp_path):
        (tmp_path / "data.jsonl").write_text('{"text": "One sample."}\n{"text": "Another one."}\n')
        (tmp_path / "data.json").write_text('[{"text": "One sample."}, {"text": "Two."}, {"text": "Three."}]')
        assert [s[0] for s in self.run(small_model, str(tmp_path / "data.jsonl"), 4, 2)] == [2]
        assert [s[0] for s in self.run(small_model, str(tmp_path / "data.json"), 2, 3)] == [2, 1]

    def test_fewer_samples_than_asked_uses_what_there_is_and_says_so(self, small_model, tmp_path, capsys):
        path = tmp_path / "three.txt"
        path.write_text("First paragraph.\n\nSecond paragraph.\n\n\n\nThird paragraph.\n")
        assert [s[0] for s in self.run(small_model, str(path), 2, 5)] == [2, 1]
        assert "only 3 samples, fewer than the 5 asked for" in capsys.readouterr().out

    @pytest.mark.parametrize("batch_size, num_samples", [(0, 4), (4, 0)])
    def test_sizes_below_one_are_rejected(self, small_model, batch_size, num_samples):
        with pytest.raises(ValueError, match="must be at least 1"):
            create_forward_loop(small_model, CALIBRATION_TEXT, gpt2_tokenizer(), "cpu", batch_size, num_samples)

    def test_the_loop_counts_the_samples_it_runs(self, small_model, tmp_path):
        path = tmp_path / "three.txt"
        path.write_text("First paragraph.\n\nSecond paragraph.\n\nThird paragraph.\n")
        assert create_forward_loop(small_model, str(path), gpt2_tokenizer(), "cpu", 2, 100).num_samples == 3

    @pytest.mark.parametrize(
        "name, content, expected",
        [
            ("empty.txt", b"", "Cannot read"),
            ("blank.txt", b"\n\n  \n", "holds no text"),
            ("binary.txt", bytes(range(256)), "UnicodeDecodeError"),
            ("malformed.json", b'[{"text": "One."},]', "Cannot read"),
        ],
    )
    def test_unreadable_files_are_a_value_error_that_names_them(self, small_model, tmp_path, name, content, expected):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{expected}|{expected}.*{re.escape(str(path))}"):
            create_forward_loop(small_model, str(path), gpt2_tokenizer(), "cpu", 4, 4)

    def test_missing_file_is_named(self, small_model, tmp_path):
        missing = str(tmp_path / "nope.txt")
        with pytest.raises(FileNotFoundError, match=re.escape(missing)):
            create_forward_loop(small_model, missing, gpt2_tokenizer(), "cpu", 4, 4)

    def test_offline_default_calibrates_on_the_shipped_text(self, small_model, monkeypatch, capsys):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        modelopt_quantize(copy.deepcopy(small_model), "int8-weight-only", num_samples=2)
        out = capsys.readouterr().out
        assert "Hugging Face Hub unreachable: calibrating on the shipped data/calibration.txt" in out


@pytest.mark.parametrize("mode, lm_head_mode", [("int4-weight-only", "int4-weight-only"), ("int8-weight-only", None)])
@torch.no_grad()
def test_quantized_output_layer_twin_matches_modelopt(hf_model, quantized, tokens, mode, lm_head_mode):
    """ModelOpt calibrates lm_head with the blocks (int4: AWQ, int8: max); the twin holds it untied and quantized,
    and the input embedding stays the model's own (AWQ rescales the head's weight in place: tied, it would rescale
    the embedding too)."""
    lm_head_mode = lm_head_mode or mode
    with_head = modelopt_quantize(
        copy.deepcopy(hf_model), mode, CALIBRATION_TEXT, batch_size=4, num_samples=4, lm_head_mode=lm_head_mode
    )
    expected = with_head(tokens).logits
    assert (expected - quantized[mode](tokens).logits).abs().max() > 1e-3  # the head's quantization is visible
    twin = load_twin(hf_model, mode, with_head, lm_head_mode=lm_head_mode)
    assert type(twin.lm_head).__name__ == ("Int4Linear" if lm_head_mode == "int4-weight-only" else "QuantLinear")
    # Each input feature through both heads: the dequantized weights [in, vocab], AWQ's input scale included. Of the
    # head's 12.9 million weights a few are rounding ties that ModelOpt's arithmetic and the twin's round apart.
    eye = torch.eye(hf_model.config.n_embd)
    apart = (twin.lm_head(eye) - with_head.lm_head(eye)).abs() > 1e-5
    assert apart.float().mean() < 1e-5
    # which moves those few vocabulary columns' logits (by about 0.02 here); every other logit matches
    far = ~torch.isclose(twin(tokens), expected, atol=1e-4, rtol=1e-4)  # [batch, seq, vocab]
    assert far.float().mean() < 1e-3
    assert torch.equal(twin.transformer.wte.weight, hf_model.transformer.wte.weight)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_the_calibration_names_the_command_line_checks_are_quant_configs(mode):
    """cli/example_args.py checks --lm-head with quant/lm_head.py's names for each mode's calibration, without
    importing ModelOpt: they must be the ones quant_config gives."""
    algorithm = quant_config(mode)["algorithm"]
    assert DEFAULT_CALIBRATION[mode] == (algorithm["method"] if isinstance(algorithm, dict) else algorithm)


@pytest.mark.parametrize(
    "mode, lm_head_mode, message",
    [
        ("float8", "int4-weight-only", "takes no other format for it"),
        ("int4-weight-only", "int8-weight-only", "calibrated with max"),
        ("int8-weight-only", "float8", "supported: int8-weight-only, int4-weight-only"),
    ],
)
def test_an_output_layer_format_the_twin_cannot_hold_is_refused(mode, lm_head_mode, message):
    with pytest.raises(ValueError, match=message):
        quant_config(mode, lm_head_mode=lm_head_mode)
