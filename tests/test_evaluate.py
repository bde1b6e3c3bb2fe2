"""The quality report (evaluate.py) on the bundled model: each mode's perplexity within a measured bound, the weight
bytes against a hand count, the perplexity against Hugging Face's own loss, and the chart as a real PNG.

The report runs once for the module, on all of data/heldout.txt (8,205 tokens) and NUM_CALIBRATION_SAMPLES
calibration paragraphs, in about ten seconds (AWQ's calibration is the slow part).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from helpers import REPO

import evaluate
from config import GPTConfig
from measure.perplexity import perplexity
from measure.twin import load_twin
from quantization import SHIPPED_CALIBRATION_TEXT
from reference import GPT
from sources.hub import BUNDLED_MODEL_DIR, load_hf_model

BUNDLED_MODEL = BUNDLED_MODEL_DIR
NUM_CALIBRATION_SAMPLES = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUTO_BITS = (5.0, 7.0)  # two of the report's budgets: a search, and two mixes calibrated and evaluated


def require_bundled_model() -> None:
    """The bundled model ships with the repository: without it these tests fail rather than skip."""
    assert os.path.isfile(os.path.join(BUNDLED_MODEL, "model.safetensors")), f"{BUNDLED_MODEL} has no checkpoint"


@pytest.fixture(scope="module")
def rows() -> dict[str, evaluate.Row]:
    require_bundled_model()
    report = evaluate.evaluate(
        BUNDLED_MODEL,
        evaluate.REPORT_MODES,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        calibration_data=SHIPPED_CALIBRATION_TEXT,
        auto_bits=AUTO_BITS,
    )
    return {row.mode: row for row in report}


def change(rows: dict[str, evaluate.Row], mode: str) -> float:
    """The relative change in perplexity against the unquantized model: 0.01 is 1% worse."""
    return rows[mode].perplexity / rows[evaluate.UNQUANTIZED].perplexity - 1


def test_report_has_every_mode_unquantized_first(rows):
    assert list(rows) == [*evaluate.REPORT_MODES[:-1], "auto 5 bits", "auto 7 bits"]
    assert all(math.isfinite(row.perplexity) and row.perplexity > 1 for row in rows.values())


# Measured on the bundled model with these settings (unquantized perplexity 170.41); each comment gives the change
# measured, and with 32 calibration samples instead of 4 in brackets. The bounds leave room for other calibration
# text or a retrained bundled model; a scale off by a factor (a wrong maxbound, amax used as the scale) moves the
# perplexity far past them.
def test_int8_is_close_to_unquantized(rows):
    # Measured: +0.02% (+0.02%). int8 per output channel keeps 255 levels per row: its rounding error is below 0.4%
    # of a row's largest weight, far below what changes next-token probabilities.
    assert abs(change(rows, "int8-weight-only")) < 0.005


def test_float8_is_close_to_unquantized(rows):
    # Measured: -0.00% (+0.13%). float8 has a 3-bit mantissa (relative error up to 1/16) on weights and activations,
    # with one scale per tensor, lm_head included: a few times int8's cost, still a small fraction of perplexity.
    assert abs(change(rows, "float8")) < 0.01


def test_int4_with_awq_costs_most_but_stays_bounded(rows):
    # Measured: +0.26% (+0.19%). int4 keeps 16 levels per block of 128 weights: the largest rounding error of the
    # three, and AWQ's scaling keeps it small.
    assert change(rows, "int4-weight-only") < 0.02
    assert change(rows, "int4-weight-only") > change(rows, "int8-weight-only")


def test_awq_pre_quant_scale_matters(rows):
    # Measured: +4.0% (+3.1%) without pre_quant_scale, 15 times int4's cost with it. Without it every layer scales
    # input feature i by 1 / s_i of AWQ's scale: a systematic error in every layer, not rounding noise.
    awq = rows["int4-weight-only"].perplexity
    dropped = rows[evaluate.INT4_WITHOUT_PRE_QUANT_SCALE].perplexity
    assert dropped > awq * 1.02
    assert change(rows, evaluate.INT4_WITHOUT_PRE_QUANT_SCALE) > 4 * change(rows, "int4-weight-only")


def test_weight_sizes_order(rows):
    sizes = {mode: row.weight_bytes for mode, row in rows.items()}
    assert sizes["int4-weight-only"] < sizes["int8-weight-only"] < sizes[evaluate.UNQUANTIZED]
    assert sizes[evaluate.INT4_WITHOUT_PRE_QUANT_SCALE] == sizes["int4-weight-only"]


def test_auto_rows_spend_their_budget_between_int4_and_unquantized(rows):
    five, seven = rows["auto 5 bits"], rows["auto 7 bits"]
    # The smallest block linear (attn.c_proj, 1/12 of the block's weights) moves the count by 1/3 bit.
    assert 4.5 < five.effective_bits <= 5.0 and 6.5 < seven.effective_bits <= 7.0
    assert rows["int4-weight-only"].weight_bytes < five.weight_bytes < seven.weight_bytes
    assert seven.weight_bytes < rows[evaluate.UNQUANTIZED].weight_bytes
    # Measured: +0.06% at 5.00 bits and +0.04% at 7.00 bits, against +0.26% for int4 alone (4 bits) and +0.01% for
    # int8 (8 bits): each extra bit goes to the layers where int4 cost the most.
    assert change(rows, "auto 5 bits") < 0.02 and change(rows, "auto 7 bits") < 0.01
    assert rows["auto 5 bits"].perplexity < rows["int4-weight-only"].perplexity


def test_chart_draws_the_auto_rows_as_a_curve(tmp_path):
    rows = [
        evaluate.Row(evaluate.UNQUANTIZED, 170.0, 15_000_000, 0.0, 1.0),
        evaluate.Row("int4-weight-only", 171.0, 13_000_000, 1.0, 1.0),
        evaluate.Row("auto 5 bits", 170.5, 13_500_000, 1.0, 1.0, effective_bits=4.9),
        evaluate.Row("auto 6 bits", 170.2, 14_000_000, 1.0, 1.0, effective_bits=6.0),
    ]
    chart = tmp_path / "chart.png"
    evaluate.save_chart(rows, str(chart))
    assert chart.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "quant_mode, expected",
    [
        # A 1-layer GPT, embedding 128, vocab 10, 8 positions. Kept in float16 (2 bytes) in every mode:
        #   wte 10 * 128 + wpe 8 * 128 + 3 LayerNorms * (128 + 128) + biases 384 + 128 + 512 + 128 = 4224 values.
        # The four block linears hold 128*384 + 128*128 + 128*512 + 512*128 = 196608 weights.
        # lm_head is wte's matrix (tied): counted once, unless float8 quantizes it into its own copy.
        (None, 4224 * 2 + 196608 * 2),
        # + a float16 scale per output channel: 384 + 128 + 512 + 128 = 1152.
        ("int8-weight-only", 4224 * 2 + 196608 * 1 + 1152 * 2),
        # Two weights per byte; a scale per 128 inputs per output: 384 + 128 + 512 + 4 * 128 = 1536;
        # AWQ's pre_quant_scale per input: 128 + 128 + 128 + 512 = 896.
        ("int4-weight-only", 4224 * 2 + 196608 // 2 + 1536 * 2 + 896 * 2),
        # A weight and an input scale per layer (5 layers with lm_head), and lm_head's own 10 * 128 float8 weights.
        ("float8", 4224 * 2 + 196608 * 1 + 5 * 2 * 2 + 10 * 128),
        # A mix: c_attn int4 (weights, 384 block scales, 128 pre_quant_scale), attn.c_proj int8 (128 scales),
        # c_fc float8 (two scalar scales), mlp.c_proj float16; lm_head unquantized, tied.
        ("auto", 4224 * 2 + 128 * 384 // 2 + (384 + 128) * 2 + 128 * 128 + 128 * 2 + 128 * 512 + 2 * 2 + 512 * 128 * 2),
    ],
)
def test_weight_bytes_match_a_hand_count(quant_mode, expected):
    mix = {
        "transformer.h.0.attn.c_attn": "int4-weight-only",
        "transformer.h.0.attn.c_proj": "int8-weight-only",
        "transformer.h.0.mlp.c_fc": "float8",
        "transformer.h.0.mlp.c_proj": None,
    }
    config = GPTConfig(
        block_size=8, vocab_size=10, num_layers=1, num_heads=2, embedding_size=128, quant_mode=quant_mode
    )
    config.layer_quant_modes = mix if quant_mode == "auto" else None
    assert evaluate.weight_bytes(GPT(config)) == expected


@torch.no_grad()
def test_perplexity_matches_hugging_face_loss():
    """exp of the mean of Hugging Face's own `labels=` loss over windows of context + 1 tokens (its loss shifts by
    one, so a window of 129 tokens scores 128 predictions, exactly our window of 128 inputs and their targets)."""
    require_bundled_model()
    hf_model = load_hf_model(BUNDLED_MODEL)
    tokens = evaluate.heldout_tokens(evaluate.DEFAULT_EVAL_DATA, max_tokens=1024)
    context = 128
    num_windows = (len(tokens) - 1) // context
    losses = [
        hf_model(
            tokens[None, i * context : (i + 1) * context + 1], labels=tokens[None, i * context : (i + 1) * context + 1]
        ).loss
        for i in range(num_windows)
    ]
    expected = math.exp(torch.stack(losses).mean().item())
    twin = load_twin(hf_model)
    assert perplexity(twin, tokens, context) == pytest.approx(expected, rel=1e-4)


def test_table_lists_the_modes_asked_for(capsys):
    require_bundled_model()
    evaluate.main(["--modes", "int8-weight-only", "--max-tokens", "300", "--num-calibration-samples", "1"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    modes = [line.split()[0] for line in lines[header + 1 :]]
    assert modes == [evaluate.UNQUANTIZED, "int8-weight-only"]
    assert lines[header + 1].split()[2] == "+0.0%"  # the baseline against itself


def test_qat_rows_train_and_report_their_training_time(capsys):
    """One QAT step of one window (the real runs are in docs/training.md): each QAT row is its calibrated model
    trained further, so its perplexity moves off the PTQ row's, and the table gains a training column."""
    require_bundled_model()
    argv = ["--modes", evaluate.INT4_MAX, "int4-weight-only-max-qat", evaluate.FINETUNED, "--max-tokens", "600"]
    argv += ["--num-calibration-samples", "1", "--qat-steps", "1", "--qat-batch-size", "1", "--qat-lr", "1e-3"]
    rows = {row.mode: row for row in evaluate.main(argv)}
    assert list(rows) == [evaluate.UNQUANTIZED, evaluate.FINETUNED, evaluate.INT4_MAX, "int4-weight-only-max-qat"]
    for mode in (evaluate.FINETUNED, "int4-weight-only-max-qat"):
        assert rows[mode].training_seconds > 0
    assert rows[evaluate.FINETUNED].perplexity != rows[evaluate.UNQUANTIZED].perplexity
    assert rows["int4-weight-only-max-qat"].perplexity != rows[evaluate.INT4_MAX].perplexity
    assert rows["int4-weight-only-max-qat"].weight_bytes == rows[evaluate.INT4_MAX].weight_bytes
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("mode "))
    assert header.endswith("training s")


def start_cli_runs(background, tmp_path_factory):
    """evaluate.py run as users run it, on the default model, in the background (conftest.py): the chart's path and a
    Future of the run. The unquantized row alone keeps it to the import time."""
    chart = tmp_path_factory.mktemp("evaluate-cli") / "quality.png"
    command = [sys.executable, "evaluate.py", "--modes", "unquantized", "--max-tokens", "300", "--chart", str(chart)]
    run = background.submit(
        subprocess.run, command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    return chart, run


def test_cli_saves_a_png_chart(cli_runs):
    require_bundled_model()
    chart, run = cli_runs.of(__name__)
    result = run.result()
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(chart)  # decodes the whole file: a truncated PNG raises
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_a_held_out_file_shorter_than_max_tokens_says_how_many_it_used(tmp_path, capsys):
    require_bundled_model()
    text = tmp_path / "heldout.txt"
    text.write_text(Path(evaluate.DEFAULT_EVAL_DATA).read_text()[:3000])  # about 700 tokens
    used = len(evaluate.heldout_tokens(str(text)))
    evaluate.main(["--modes", "unquantized", "--eval-data", str(text), "--max-tokens", "100000"])
    assert f"has only {used:,} tokens, fewer than the 100,000 asked for: using {used:,}" in capsys.readouterr().out


def test_an_int8_kv_row_is_measured_in_the_onnx_runtime_flavor_alone():
    """--onnx on a -kv-int8 row: the standard file keeps a float32 cache, so only the ONNX Runtime flavor, which
    stores the int8 one, is measured, near the twin's perplexity with the same cache (its fast kernels' int8
    activations move it a little; test_onnx_fused.py holds the cache itself to the twin)."""
    require_bundled_model()
    mode = "int8-weight-only-kv-int8"
    report = evaluate.evaluate(
        BUNDLED_MODEL,
        [mode],
        max_tokens=600,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        calibration_data=SHIPPED_CALIBRATION_TEXT,
        onnx=True,
    )
    rows = {row.mode: row for row in report}
    assert [name for name in rows if name.startswith(mode)] == [mode, f"{mode}, ONNX Runtime flavor"]
    flavor = rows[f"{mode}, ONNX Runtime flavor"].perplexity / rows[mode].perplexity - 1
    assert abs(flavor) < 0.01


def test_onnx_rows_measure_onnx_runtime_on_each_modes_file():
    """--onnx: the exported file in ONNX Runtime at float32 math gives the twin's perplexity; at its default level
    the int8 activations cost a measured, small change (here: int4, the mode whose fast kernels ONNX Runtime fuses),
    and the ONNX Runtime flavor, the same kernels on the same integers, costs about what the standard file does."""
    require_bundled_model()
    report = evaluate.evaluate(
        BUNDLED_MODEL,
        ["int4-weight-only"],
        max_tokens=600,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        calibration_data=SHIPPED_CALIBRATION_TEXT,
        onnx=True,
    )
    rows = {row.mode: row for row in report}
    assert list(rows) == [
        evaluate.UNQUANTIZED,
        f"{evaluate.UNQUANTIZED}, ONNX Runtime",
        f"{evaluate.UNQUANTIZED}, ONNX Runtime, float32 math",
        f"{evaluate.UNQUANTIZED}, ONNX Runtime flavor",
        "int4-weight-only",
        "int4-weight-only, ONNX Runtime",
        "int4-weight-only, ONNX Runtime, float32 math",
        "int4-weight-only, ONNX Runtime flavor",
    ]
    for mode in (evaluate.UNQUANTIZED, "int4-weight-only"):
        assert rows[f"{mode}, ONNX Runtime, float32 math"].perplexity == pytest.approx(rows[mode].perplexity, rel=1e-5)
    fast = rows["int4-weight-only, ONNX Runtime"].perplexity / rows["int4-weight-only"].perplexity - 1
    assert fast != pytest.approx(0, abs=1e-6) and abs(fast) < 0.05
    flavor = rows["int4-weight-only, ONNX Runtime flavor"].perplexity / rows["int4-weight-only"].perplexity - 1
    assert flavor != pytest.approx(0, abs=1e-6) and abs(flavor - fast) < 0.001  # its fast kernels ran, as the file's
