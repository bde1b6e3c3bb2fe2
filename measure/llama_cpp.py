"""llama.cpp on the same random weights, for benchmark.py --backend onnx: what a reader who wants a fast quantized
GPT-2 on a CPU would pick instead of this example's ONNX file.

The tools come from measure/build_llama_cpp.sh (llama.cpp as vendored in the llama-cpp-python sdist on PyPI), in
out/llama.cpp/bin or the folder LLAMA_CPP_DIR names. The Hugging Face model is converted by llama.cpp's own
convert_hf_to_gguf.py to F32, quantized by llama-quantize to Q8_0 and Q4_0, and timed by llama-batched-bench as
benchmark.py times the others: a prompt of P tokens then N new ones per sequence, at each batch size, new tokens per
second of the whole run (prompt pass included). benchmark.py runs it in turn with its own contenders, round by round,
and keeps the fastest of --repeats runs, as for them.
"""

import json
import os
import re
import subprocess
import sys

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


def convert(hf_model, folder: str, work: str) -> dict[str, str]:
    """{"llama.cpp Q4_0": the path of its GGUF file, ...} for each of FORMATS, written under `work`: hf_model saved,
    converted by llama.cpp's convert_hf_to_gguf.py to F32 and quantized by llama-quantize to the others."""
    from sources.tokenizer import gpt2_tokenizer

    hf_dir = os.path.join(work, "hf")
    hf_model.save_pretrained(hf_dir)
    gpt2_tokenizer().save_pretrained(hf_dir)
    add_n_ctx(os.path.join(hf_dir, "config.json"))
    f32 = os.path.join(work, "F32.gguf")
    convert_script = [sys.executable, os.path.join(folder, "convert_hf_to_gguf.py"), hf_dir, "--outtype", "f32"]
    env = {**os.environ, "PYTHONPATH": os.path.join(folder, "gguf-py")}
    subprocess.run([*convert_script, "--outfile", f32], check=True, capture_output=True, env=env)
    ggufs = {}
    for fmt in FORMATS:
        gguf = os.path.join(work, f"{fmt}.gguf")
        if fmt != "F32":
            subprocess.run([os.path.join(folder, "llama-quantize"), f32, gguf, fmt], check=True, capture_output=True)
        ggufs[f"llama.cpp {fmt}"] = gguf
    return ggufs


def add_n_ctx(config_path: str) -> None:
    """convert_hf_to_gguf.py reads GPT-2's context length as `n_ctx`, which gpt2's own config.json has and
    transformers 5 no longer writes."""
    with open(config_path) as file:
        config = json.load(file)
    config["n_ctx"] = config["n_positions"]
    with open(config_path, "w") as file:
        json.dump(config, file, indent=2)


def tokens_per_second(folder: str, gguf: str, threads: int, prompt_len: int, new_tokens: int, batch: int) -> float:
    """One llama-batched-bench run at one batch size: batch * new_tokens / seconds of the whole run, prompt pass
    included."""
    context = batch * (prompt_len + new_tokens) + 16
    command = [os.path.join(folder, "llama-batched-bench"), "-m", gguf, "-c", str(context), "-b", "2048"]
    command += ["-ub", "512", "-t", str(threads), "-tb", str(threads), "-npp", str(prompt_len)]
    command += ["-ntg", str(new_tokens), "-npl", str(batch)]
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in (output.stdout + output.stderr).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 10 and all(re.fullmatch(r"[\d.]+", cell) for cell in cells) and int(cells[2]) == batch:
            return batch * new_tokens / float(cells[8])
    raise RuntimeError(f"llama-batched-bench printed no row for batch {batch}: {' '.join(command)}")
