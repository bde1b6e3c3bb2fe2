import pytest
from helpers import CALIBRATION_PARAGRAPHS, make_gpt2


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> str:
    """A directory holding a small GPT-2 checkpoint, saved the way Hugging Face saves gpt2."""
    path = tmp_path_factory.mktemp("gpt2-small-random")
    make_gpt2().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> str:
    """A .txt of four short paragraphs: calibration samples for ModelOpt that take seconds, not minutes."""
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text("\n\n".join(CALIBRATION_PARAGRAPHS) + "\n")
    return str(path)
