"""AutoQuantize: ModelOpt's per-layer search over this example's modes, and the twin of the mixed model it makes.

The truth is ModelOpt's own mixed model (fake-quantized Hugging Face GPT-2) and the search state mtq.auto_quantize
returns; the twin is built from the per-layer formats (GPTConfig.layer_quant_modes) and loaded by weight_loader.py.
"""

import copy
import json
import os

import pytest
import torch
from helpers import CALIBRATION_PARAGRAPHS, MIXED_LAYER_QUANT_MODES, make_gpt2

from config import AUTO_QUANT_MODE, EFFECTIVE_BITS_RANGE
from measure.twin import load_twin
from quant.auto_quantize import (
    SEARCHED_MODES,
    Recipe,
    _run_auto_quantize,
    auto_quantize,
    format_recipe,
    load_recipe,
    quantize_with_recipe,
    recipe_from_model,
    round_scores,
    save_recipe,
    search_recipes,
)
from quantization import SHIPPED_CALIBRATION_TEXT
from reference import Int4Linear, QuantLinear
from weight_loader import get_submodule

MIXED = MIXED_LAYER_QUANT_MODES
SAMPLES = dict(batch_size=4, num_samples=8)


@pytest.fixture(scope="module")
def hf_model():
    # Mild outliers, as in the float8 end-to-end test of test_quantization.py: float8's single rounding steps are not
    # amplified by large LayerNorm gains.
    return make_gpt2(outlier_gain=3.0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def mixed(hf_model):
    recipe = Recipe(MIXED, effective_bits=0.0)
    return quantize_with_recipe(copy.deepcopy(hf_model), recipe, SHIPPED_CALIBRATION_TEXT, **SAMPLES)


@pytest.fixture(scope="module")
def searched(hf_model):
    """ModelOpt's search at 6 bits: the model, its search state, and the recipe read back from the model."""
    model, state, _ = _run_auto_quantize(copy.deepcopy(hf_model), 6.0, SHIPPED_CALIBRATION_TEXT, **SAMPLES)
    return model, state, recipe_from_model(model)


def mode_of(quant_recipe) -> str | None:
    """ModelOpt names the custom formats CUSTOM_<index in quantization_formats>, which _run_auto_quantize passes in
    SEARCHED_MODES order; NONE is its unquantized choice."""
    label = str(quant_recipe).split("(")[0]
    return None if label == "NONE" else SEARCHED_MODES[int(label.removeprefix("CUSTOM_"))]


def mixed_twin(hf_model, quantized, layers):
    return load_twin(hf_model, AUTO_QUANT_MODE, quantized, layer_quant_modes=layers)


@torch.no_grad()
def test_mixed_twin_layers_match_modelopt(hf_model, mixed, tokens):
    """Each layer of the twin, fed the input ModelOpt's layer saw, gives ModelOpt's output within its format's
    tolerance: integer formats to float rounding, float8 up to single FP8 steps in under 0.1% of the outputs."""
    seen = {}
    hooks = [
        get_submodule(mixed, name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
        for name in MIXED
    ]
    mixed(tokens)
    for hook in hooks:
        hook.remove()
    twin = mixed_twin(hf_model, mixed, MIXED)
    for name, mode in MIXED.items():
        layer = get_submodule(twin, name)
        expected_type = {None: torch.nn.Linear, "int4-weight-only": Int4Linear}.get(mode, QuantLinear)
        assert type(layer) is expected_type, name
        layer_input, expected = seen[name]
        difference = (layer(layer_input) - expected).abs()
        if mode is None:
            assert difference.max() < 1e-5 * expected.abs().max(), name
        else:
            # A weight exactly between two steps may round the other way (ModelOpt multiplies by the reciprocal
            # of the scale, TensorRT divides): rare single steps, as in test_quantization.py.
            close, largest = (1e-3, 1e-2) if mode == "float8" else (1e-5, 1e-3)
            assert (difference > close * expected.abs().max()).float().mean() < 1e-3, name
            assert difference.max() < largest * expected.abs().max(), name


@torch.no_grad()
def test_mixed_twin_matches_modelopt_end_to_end(hf_model, mixed, tokens):
    """As for float8 alone: an order of magnitude closer to ModelOpt than ModelOpt is to the unquantized model."""
    expected = mixed(tokens).logits
    quantization_effect = (expected - hf_model(tokens).logits).abs().max()
    twin_error = (mixed_twin(hf_model, mixed, MIXED)(tokens) - expected).abs().max()
    assert twin_error < 0.1 * quantization_effect


@torch.no_grad()
def test_one_layer_in_the_wrong_format_is_refused(hf_model, mixed):
    """int8 and float8 twins hold the same parameter names and shapes: only the format check tells them apart."""
    wrong = dict(MIXED, **{"transformer.h.0.attn.c_proj": "float8"})
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_proj was not quantized for float8"):
        mixed_twin(hf_model, mixed, wrong)
    unquantized = dict(MIXED, **{"transformer.h.1.mlp.c_fc": None})
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_fc is quantized by ModelOpt"):
        mixed_twin(hf_model, mixed, unquantized)


def test_quantizers_only_where_the_recipe_says(mixed):
    enabled = {
        name
        for name, module in mixed.named_modules()
        if type(module).__name__.endswith("Quantizer") and module.is_enabled
    }
    expected = {f"{layer}.weight_quantizer" for layer, mode in MIXED.items() if mode is not None}
    expected |= {f"{layer}.input_quantizer" for layer, mode in MIXED.items() if mode == "float8"}
    assert enabled == expected


def test_search_keeps_to_the_budget_and_the_recipe_reads_back_modelopts_choice(searched):
    model, state, recipe = searched
    assert state["best"]["is_satisfied"]
    chosen = {name.removesuffix(".quant_recipe"): mode_of(r) for name, r in state["best"]["recipe"].items()}
    assert chosen.pop("lm_head") is None
    assert chosen == recipe.layers
    assert recipe.effective_bits == pytest.approx(state["best"]["constraints"]["effective_bits"])
    assert recipe.effective_bits <= 6.0
    assert len({mode for mode in recipe.layers.values()}) > 1  # a mix, not one format everywhere


def test_search_spends_the_budget(hf_model):
    """Every budget is used up to the last layer that fits, and more bits buy better formats: the solver sees
    scores large enough to tell apart (SCORE_SCALE). Unscaled, it returned all int4 for 4.5 bits here, and 7.5
    bits, nothing left unquantized, for 12."""
    recipes = search_recipes(hf_model, [4.5, 6.0, 12.0], SHIPPED_CALIBRATION_TEXT, **SAMPLES)
    # The smallest layer (attn.c_proj, 1/24 of the weights) moves the count by 1/6 bit from int4 to int8.
    for recipe, budget in zip(recipes, [4.5, 6.0, 12.0], strict=True):
        assert budget - 0.5 < recipe.effective_bits <= budget, budget
    assert None in recipes[2].layers.values()  # 12 bits leave layers unquantized, the best choice when they fit
    assert "float8" not in recipes[1].layers.values()  # see test_float8_scores_its_own


def test_float8_scores_its_own(searched):
    """int8 and float8 both count 8 bits; ModelOpt lowers the later one's score to the earlier one's. float8 comes
    first (auto_quantize_format), so its score is its own: here it quantizes activations too and scores worse than
    int8 on every layer, rather than tying with it and being picked at random."""
    _, state, _ = searched
    for name, stats in state["candidate_stats"].items():
        if name.startswith("lm_head"):
            continue
        labels = [mode_of(quant_recipe) for quant_recipe in stats["formats"]]
        scores = dict(zip(labels, stats["scores"], strict=True))
        assert labels == ["int4-weight-only", "float8", "int8-weight-only", None], name
        assert scores["float8"] > scores["int8-weight-only"], name


@torch.no_grad()
def test_recipe_replayed_gives_the_searched_model(hf_model, searched, tokens, tmp_path):
    model, _, recipe = searched
    path = str(tmp_path / "recipe.json")
    save_recipe(recipe, path)
    loaded = load_recipe(path)
    assert loaded.layers == recipe.layers
    replayed = quantize_with_recipe(copy.deepcopy(hf_model), loaded, SHIPPED_CALIBRATION_TEXT, **SAMPLES)
    torch.testing.assert_close(replayed(tokens).logits, model(tokens).logits, atol=0, rtol=0)


def test_auto_quantize_prints_the_search(hf_model, tmp_path, capsys):
    calibration = tmp_path / "three.txt"  # fewer samples than asked for: the report says how many it used
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS[:3]))
    recipe = auto_quantize(copy.deepcopy(hf_model), 5.0, str(calibration), batch_size=4, num_samples=4)
    assert recipe.effective_bits <= 5.0
    assert "AutoQuantize searched 8 layers on 3 samples for 5 effective bits" in capsys.readouterr().out
    table = format_recipe(recipe).splitlines()
    assert table[0].split() == ["layer", "format", "bits"]
    assert len(table) == 1 + 8 + 1 and table[-1].split()[-1] == f"{recipe.effective_bits:.2f}"


@pytest.mark.parametrize("bits", [EFFECTIVE_BITS_RANGE[0] - 0.1, EFFECTIVE_BITS_RANGE[1] + 0.1])
def test_effective_bits_out_of_reach_are_refused_before_any_work(bits):
    with pytest.raises(ValueError, match=r"effective_bits must be between 4 \(all int4\) and 16"):
        auto_quantize(None, bits)


def test_a_recipe_reports_the_samples_it_calibrated_on(hf_model, tmp_path, capsys):
    calibration = tmp_path / "two.txt"
    calibration.write_text("\n\n".join(CALIBRATION_PARAGRAPHS[:2]))
    quantize_with_recipe(copy.deepcopy(hf_model), Recipe(MIXED, 6.0), str(calibration), batch_size=4, num_samples=100)
    assert "Calibrated the recipe's formats on 2 samples" in capsys.readouterr().out


def test_recipe_for_another_model_is_refused(tmp_path):
    model = make_gpt2(n_embd=128, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="The recipe's layers do not match the model's"):
        quantize_with_recipe(model, Recipe(MIXED, 6.0), SHIPPED_CALIBRATION_TEXT, batch_size=4, num_samples=4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read the recipe"),
        ('{"layers": {}}', "is not a recipe"),
        ('{"effective_bits": 6, "layers": {"transformer.h.0.mlp.c_fc": "int3"}}', r"unknown formats \['int3'\]"),
    ],
)
def test_bad_recipe_files_are_named(tmp_path, content, message):
    path = tmp_path / "recipe.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_recipe(str(path))


def test_recipe_file_is_plain_json(tmp_path):
    path = tmp_path / "recipe.json"
    save_recipe(Recipe(MIXED, 7.0), str(path))
    data = json.loads(path.read_text())
    assert data["layers"]["transformer.h.0.mlp.c_proj"] == "unquantized"
    assert data["layers"]["transformer.h.0.mlp.c_fc"] == "float8"


def test_scores_equal_within_float_noise_round_to_the_same_value():
    """Scores from runs on other thread counts differed by 2e-7 (relative): rounded, they are one value, so the
    solver sees a tie the same way every run; differences of a tenth of a percent stay."""
    scores = [29.06123, 3.083417, 0.1161422, 0.0]
    noisy = [score * (1 + 2e-7) for score in scores]
    apart = [score * (1 + 1e-3) for score in scores]
    states = [
        {"candidate_stats": {"transformer.h.0.attn.c_attn.quant_recipe": {"scores": s}}} for s in (scores, noisy, apart)
    ]
    for state in states:
        round_scores(state)
    rounded = [state["candidate_stats"]["transformer.h.0.attn.c_attn.quant_recipe"]["scores"] for state in states]
    assert rounded[0] == rounded[1] == [29.06, 3.083, 0.1161, 0.0]
    assert all(a != b for a, b in zip(rounded[0][:3], rounded[2][:3], strict=True))


def test_the_default_recipe_goes_to_out(tmp_path, monkeypatch):
    """--quant-mode auto without --recipe-out writes its recipe into out/ (git ignores it), never the checkout's root:
    run from a fresh folder, out/ is made and the path lies in it."""
    from cli.example_args import parse_args, recipe_out_path

    monkeypatch.chdir(tmp_path)
    path = recipe_out_path(parse_args(["--quant-mode", "auto", "--effective-bits", "6"]))
    assert os.path.dirname(os.path.normpath(path)) == "out" and os.path.isdir("out")
