"""llama.cpp on the same random weights, for benchmark.py --backend onnx: what a reader who wants a fast quantized
GPT-2 on a CPU would pick instead of this example's ONNX file.

The tools come from measure/build_llama_cpp.sh (llama.cpp as vendored in the llama-cpp-python sdist on PyPI), in
out/llama.cpp/bin or the folder LLAMA_CPP_DIR names. The Hugging Face model is converted by llama.cpp's own
convert_hf_to_gguf.py to F32, quantized by llama-quantize to Q8_0 and Q4_0, and timed by llama-batched-bench as
benchmark.py times the others: a prompt of P tokens then N new ones per sequence, at each batch size, new tokens per
second of the whole run (prompt pass included), the fastest of --repeats runs.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

DEFAULT_DIR = os.path.join("out", "llama.cpp")
FORMATS = ("F32", "Q8_0", "Q4_0")
TOOLS = ("llama-batched-bench", "llama-quantize", "convert_hf_to_gguf.py")


def tools_dir() -> tuple[str | None, str]:
    """The folder holding llama.cpp's tools, or None and why not."""
    folder = os.path.join(os.environ.get("LLAMA_CPP_DIR", DEFAULT_DIR), "bin")
    missing = [tool for tool in TOOLS if not os.path.exists(os.path.join(folder, tool))]
    if missing:
        return None, f"llama.cpp rows skipped: no {', '.join(missing)} in {folder} (bash measure/build_llama_cpp.sh)"
    return folder, ""


def race(
    hf_model, threads: int, prompt_len: int, new_tokens: int, batch_sizes: list[int], repeats: int
) -> dict[str, dict]:
    """{"llama.cpp Q4_0": {batch: new tokens/s}, ...} for each of FORMATS, on hf_model's weights: the fastest of
    `repeats` runs, as benchmark.py counts its own contenders."""
    from sources.tokenizer import gpt2_tokenizer

    folder, reason = tools_dir()
    if folder is None:
        raise FileNotFoundError(reason)
    rates = {}
    with tempfile.TemporaryDirectory() as work:
        hf_dir = os.path.join(work, "hf")
        hf_model.save_pretrained(hf_dir)
        gpt2_tokenizer().save_pretrained(hf_dir)
        add_n_ctx(os.path.join(hf_dir, "config.json"))
        f32 = os.path.join(work, "F32.gguf")
        convert = [sys.executable, os.path.join(folder, "convert_hf_to_gguf.py"), hf_dir, "--outtype", "f32"]
        env = {**os.environ, "PYTHONPATH": os.path.join(folder, "gguf-py")}
        subprocess.run([*convert, "--outfile", f32], check=True, capture_output=True, env=env)
        for fmt in FORMATS:
            gguf = os.path.join(work, f"{fmt}.gguf")
            if fmt != "F32":
                quantize = [os.path.join(folder, "llama-quantize"), f32, gguf, fmt]
                subprocess.run(quantize, check=True, capture_output=True)
            runs = [batched_bench(folder, gguf, threads, prompt_len, new_tokens, batch_sizes) for _ in range(repeats)]
            rates[f"llama.cpp {fmt}"] = {batch: max(run[batch] for run in runs) for batch in batch_sizes}
    return rates


def add_n_ctx(config_path: str) -> None:
    """convert_hf_to_gguf.py reads GPT-2's context length as `n_ctx`, which gpt2's own config.json has and
    transformers 5 no longer writes."""
    with open(config_path) as file:
        config = json.load(file)
    config["n_ctx"] = config["n_positions"]
    with open(config_path, "w") as file:
        json.dump(config, file, indent=2)


def batched_bench(folder: str, gguf: str, threads: int, prompt_len: int, new_tokens: int, batch_sizes: list[int]):
    """llama-batched-bench's rows as {batch: batch * new_tokens / seconds of the whole run}."""
    context = max(batch_sizes) * (prompt_len + new_tokens) + 16
    command = [os.path.join(folder, "llama-batched-bench"), "-m", gguf, "-c", str(context), "-b", "2048"]
    command += ["-ub", "512", "-t", str(threads), "-tb", str(threads), "-npp", str(prompt_len)]
    command += ["-ntg", str(new_tokens), "-npl", ",".join(map(str, batch_sizes))]
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    rates = {}
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in (output.stdout + output.stderr).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 10 and all(re.fullmatch(r"[\d.]+", cell) for cell in cells):
            batch, seconds = int(cells[2]), float(cells[8])
            rates[batch] = batch * new_tokens / seconds
    return rates
