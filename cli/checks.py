"""Checks of what a user hands the scripts, done where it enters, before any slow work: numbers, folders and files.

Only the standard library is imported, so a script's `parse_args` can run these before torch. Each check raises
`cli.UsageError` with one line that names the input, what is wrong with it, and what is accepted.
"""

import argparse
import json
import math
import os
import tempfile

from cli import UsageError
from config import INT4_BLOCK_SIZE
from sources.hub import (
    GPT2_VOCAB_SIZE,
    HUB_MODELS,
    check_checkpoint_dir,
    context_length,
    hub_reachable,
    machine_memory,
    model_width,
)

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
# AdamW moves each weight by about the learning rate per step: above 1 a step is larger than the weights themselves,
# and training turns the model into NaNs.
MAX_LEARNING_RATE = 1.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file
CALIBRATION_EXTENSIONS = (".txt", ".json", ".jsonl")


def finite_float(text: str) -> float:
    """argparse type: a real number; nan and inf are refused (inf as a temperature samples uniform noise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed torch accepts, 0 to 2**64 - 1 (torch also maps negative seeds onto that range)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """argparse type: a learning rate, above 0 and at most 1."""
    value = finite_float(text)
    if not 0 < value <= MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(
            f"expected a learning rate above 0 and at most {MAX_LEARNING_RATE:g}, got {text!r}"
        )
    return value


def check_at_least(args: argparse.Namespace, least: int, *names: str) -> None:
    """Each of the parsed counts `names` (argparse's names: n_layer for --n-layer) is at least `least`; a refusal
    names the first that is not, and only it."""
    for name in names:
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")


def check_prompt(text: str, flag: str) -> None:
    if not text.strip():
        raise UsageError(f"{flag} is empty: give a prompt for the model to continue")
    try:  # bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer would silently replace
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} is not valid UTF-8: check the terminal's encoding") from None


def check_model_type(model_type: str, flag: str = "--model-type") -> None:
    """A Hub name, or a folder that holds a GPT-2 checkpoint (config.json and the weights' header are read)."""
    if model_type in HUB_MODELS:
        return
    check_path_name(model_type, flag)
    if not os.path.isdir(model_type):
        raise UsageError(
            f"unknown {flag} {model_type!r}: expected one of {', '.join(HUB_MODELS)} or a local GPT-2 checkpoint "
            "directory"
        )
    try:
        check_checkpoint_dir(model_type)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def check_int4_width(model_type: str, advice: str) -> None:
    """int4 quantizes blocks of INT4_BLOCK_SIZE input features: a model of another width is refused before it is
    downloaded or calibrated (`model_type` passed check_model_type). `advice` says what to do instead."""
    width = model_width(model_type)
    if width % INT4_BLOCK_SIZE:
        raise UsageError(
            f"{model_type} is {width} wide, not a multiple of int4's blocks of {INT4_BLOCK_SIZE}: {advice}"
        )


def check_text_file(path: str, flag: str) -> str:
    """A file of UTF-8 text that is not empty; returns the text."""
    if not os.path.isfile(path):
        raise UsageError(
            f"{flag}: {path} not found{' (it is a folder)' if os.path.isdir(path) else ''}: expected a text file"
        )
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:  # no permission to read it, a disk error
        raise UsageError(f"cannot read {flag} {path}: {error.strerror}") from None
    if b"\0" in data:
        raise UsageError(f"{flag} {path} is a binary file: expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    if not text.strip():
        raise UsageError(f"{flag} {path} is empty: expected text")
    return text


def check_output_dir(path: str, flag: str, overwrite: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuses a folder whose files a run would replace, unless `overwrite`; refuses the folders of `sources`
    (the model being read) and anything inside them always; and checks that the folder can be created and written to."""
    if not path.strip():  # "" would mean the current folder to the code that writes
        raise UsageError(f"{flag} is empty: name a folder")
    check_path_name(path, flag)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder: choose a new or empty folder")
    for source in sources:
        if os.path.isdir(source) and is_within(path, source):
            raise UsageError(
                f"{flag} {path} is {'the' if is_within(source, path) else 'inside the'} folder the model is read "
                "from: choose a new or empty folder"
            )
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(
            f"{flag} {path} is not empty: choose a new or empty folder, or pass --overwrite to replace the files "
            "of the same names in it"
        )
    check_writable(path, flag)


def check_output_file(path: str, flag: str, new: bool = False) -> None:
    """A file the run writes at the end: its folder must exist and be writable, and it is not a folder, a pipe or
    a read-only file. With `new`, it must not exist yet (a saved model or recipe: a chart is made to be replaced,
    anything else is not)."""
    if not path.strip():
        raise UsageError(f"{flag} is empty: name a file")
    check_path_name(path, flag)
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: name a file")
    if new and os.path.lexists(path):
        raise UsageError(f"{flag} {path} already exists: name a new file (nothing is overwritten)")
    if os.path.islink(path):
        raise UsageError(f"{flag} {path} is a symbolic link to {os.readlink(path)}: name the file itself")
    if os.path.exists(path) and not os.path.isfile(path):  # a pipe or a device: writing to it could wait forever
        raise UsageError(f"{flag} {path} is not a regular file: name a file")
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {flag} {path}: it is read-only")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    check_writable(folder, flag)


def check_chart(path: str, flag: str = "--chart") -> None:
    """A .png file to write a chart to: a new file, or a PNG (an earlier chart) that the run replaces."""
    if not path.lower().endswith(".png"):
        raise UsageError(f"{flag} must name a .png file, got {path}")
    check_output_file(path, flag)
    if os.path.isfile(path):
        with open(path, "rb") as file:
            if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise UsageError(f"{flag} {path} exists and is not a PNG image: name a new file or an earlier chart")


def check_path_name(path: str, flag: str) -> None:
    """Refuses a path that is a symbolic link to nothing, or that is not valid UTF-8, which the safetensors and
    ModelOpt writers cannot take (bytes that are not UTF-8 reach Python as lone surrogates)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag}: the path {path!r} is not valid UTF-8: name it in UTF-8") from None
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist")


def is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, once symbolic links are resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_writable(path: str, flag: str) -> None:
    """Whether a folder could be created at `path` and written to, tried in its nearest existing ancestor.

    A temporary folder is made and removed there: unlike os.access, that also catches a read-only file system,
    and it works the same for root."""
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"cannot create {flag} {path}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor))
    except OSError as error:
        raise UsageError(f"cannot write {flag} {path}: {error.strerror} in {ancestor}") from None


def check_calibration_data(calibration_data: str, flag: str = "--calibration-data") -> None:
    """cnn_dailymail, which needs the Hugging Face Hub, or a local calibration file (`check_calibration_file`)."""
    if calibration_data != "cnn_dailymail":
        check_calibration_file(calibration_data, flag)
    elif not hub_reachable():
        raise UsageError(
            "cannot download cnn_dailymail for calibration: the Hugging Face Hub is unreachable. "
            "Pass a local file instead, e.g. --calibration-data data/calibration.txt"
        )


def check_datasets_cache() -> None:
    """`datasets`, which reads the calibration text, writes a cache of it first: the folder must be writable. Found
    as `datasets` finds it, from HF_DATASETS_CACHE, HF_HOME or XDG_CACHE_HOME, whichever is set first."""
    variable = next((name for name in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME") if os.environ.get(name)), None)
    if variable == "HF_DATASETS_CACHE":
        folder = os.environ[variable]
    elif variable == "HF_HOME":
        folder = os.path.join(os.environ[variable], "datasets")
    else:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface", "datasets")
    check_writable(os.path.expanduser(folder), f"the calibration data's cache ({variable or 'in ~/.cache'})")


def check_calibration_file(path: str, flag: str = "--calibration-data") -> int:
    """A local calibration file must be UTF-8 text with at least one sample; returns how many samples it holds.

    .txt: one sample per paragraph (blank lines between). .json: a list of records; .jsonl: one record a line;
    each record is an object whose "text" is a string (quantization.py reads the same layouts with `datasets`)."""
    accepted = "cnn_dailymail or a .txt/.json/.jsonl file"
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: expected {accepted}")
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: calibration data not found: {path} (expected {accepted})")
    if any(character in path for character in "*?["):  # `datasets` would read the path as a pattern
        raise UsageError(f"{flag} {path}: a path with * ? or [ is read as a pattern of files: rename the file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in CALIBRATION_EXTENSIONS:
        raise UsageError(f"{flag}: unsupported calibration file {path}: expected a .txt, .json or .jsonl file")
    text = check_text_file(path, flag)
    if extension == ".txt":
        count = sum(1 for paragraph in text.split("\n\n") if paragraph.strip())
    else:
        count = _count_json_texts(text, path, flag, extension)
    if count == 0:
        raise UsageError(f"{flag} {path} holds no text to calibrate on: expected {accepted}")
    return count


def _count_json_texts(text: str, path: str, flag: str, extension: str) -> int:
    """How many records of a .json list of records, or of JSON lines, hold a non-empty "text" string."""
    records = _json_records(text, path, flag, extension)
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise UsageError(f"{flag} {path}: expected records (JSON objects) with a 'text' field each")
    if records and all("text" not in record for record in records):
        raise UsageError(f"{flag} {path} has no 'text' field (fields: {', '.join(sorted(records[0]))})")
    count = 0
    for number, record in enumerate(records, start=1):
        value = record.get("text")
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{flag} {path}: the 'text' of record {number} is not a string: {value!r:.40}")
        count += bool(value and value.strip())
    return count


def _json_records(text: str, path: str, flag: str, extension: str) -> object:
    """A .json file's value, or the values of its lines; `datasets` reads JSON lines from a .json file too."""
    whole_file_error = None
    try:
        if extension == ".json":
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                whole_file_error = error
        return _json_lines(text, path, flag, extension, whole_file_error)
    except RecursionError:
        raise UsageError(f"{flag} {path} is nested too deeply to read: expected records with a 'text' field") from None


def _json_lines(
    text: str, path: str, flag: str, extension: str, whole_file_error: json.JSONDecodeError | None
) -> list[object]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            line, column, message = number, error.colno, error.msg
            if whole_file_error is not None:  # a .json file: report where the file as a whole stops parsing
                line, column, message = whole_file_error.lineno, whole_file_error.colno, whole_file_error.msg
            raise UsageError(
                f"{flag} {path} is not valid JSON: {message} at line {line} column {column} (expected "
                f"{'a list of records' if extension == '.json' else 'one JSON record a line'})"
            ) from None
    return records


def check_fits_in_memory(what: str, num_bytes: float) -> None:
    """Refuses sizes whose tensors alone would take more than the machine's memory, before allocating them."""
    total = machine_memory()
    if num_bytes > total:
        raise UsageError(
            f"{what} need about {num_bytes / 1e9:,.1f} GB, more than this machine's {total / 1e9:.1f} GB of memory: "
            "choose smaller sizes"
        )


def check_finetuning_fits(model_type: str, batch_size: int, flag: str) -> None:
    """Refuses a fine-tuning batch whose logits alone would not fit: [batch, n_positions, vocab] in float32, held
    three times over (the logits, their gradient and the softmax of the loss). `model_type` is checked already."""
    positions = context_length(model_type)
    check_fits_in_memory(
        f"fine-tuning batches of {flag} {batch_size} windows of {positions} tokens",
        3 * 4 * batch_size * positions * GPT2_VOCAB_SIZE,
    )
