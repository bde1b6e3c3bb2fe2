"""Session-wide fixtures, and the background runs of example.py.

A file whose tests check example.py run as users run it, in subprocesses, defines `start_cli_runs(background,
tmp_path_factory)`: it prepares what the runs need, submits them with `background.submit` and returns what its tests
wait on (Futures of subprocess.CompletedProcess, and the paths they check). The runs of every such file start as the
session starts, two at a time, and the tests that check them (those that ask for `cli_runs`) run after the others:
the subprocesses, scheduled as idle, keep the second core busy while the tests in this process, on one thread, keep
the first.
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor, wait

import pytest
from helpers import CALIBRATION_PARAGRAPHS, make_gpt2


def schedule_as_idle() -> None:
    """This thread, and every process it starts, get only the CPU time other processes leave (SCHED_IDLE): the tests
    in the pytest process keep a whole core, and the background runs take the rest."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class BackgroundRuns:
    """A pool of two threads, each waiting on one subprocess at a time, and what each file's start_cli_runs returned."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=2, initializer=schedule_as_idle)
        self.futures: list[Future] = []
        self.started: dict[str, object] = {}

    def submit(self, function, *args, **kwargs) -> Future:
        future = self.pool.submit(function, *args, **kwargs)
        self.futures.append(future)
        return future

    def of(self, module_name: str):
        """What the file's start_cli_runs returned; if it raised, that exception, in each of the file's tests."""
        started = self.started[module_name]
        if isinstance(started, Exception):
            raise started
        return started

    def wait(self) -> None:
        """Until every run submitted has ended: before a test changes what a new subprocess would inherit."""
        wait(self.futures)


def run_order(item: pytest.Item) -> int:
    """0: the tests that run in this process only; 1: the tests that wait on background runs, so that their runs are
    done, or nearly, when they wait; 2: the files that change, for a moment, what every new subprocess inherits
    (RLIMIT_FSIZE), once no background run is left to start."""
    if getattr(getattr(item, "module", None), "RUNS_AFTER_THE_BACKGROUND", False):
        return 2
    return 1 if "cli_runs" in getattr(item, "fixturenames", ()) else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=run_order)  # each file keeps its order within each group


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory) -> BackgroundRuns:
    """Starts the runs of every file collected that defines start_cli_runs, in the order its tests will run."""
    background = BackgroundRuns()
    modules = dict.fromkeys(getattr(item, "module", None) for item in request.session.items if run_order(item) == 1)
    for module in modules:
        if not hasattr(module, "start_cli_runs"):
            continue
        try:
            background.started[module.__name__] = module.start_cli_runs(background, tmp_path_factory)
        except Exception as error:  # one file's broken setup fails that file's tests, not the session
            background.started[module.__name__] = error
    yield background
    background.pool.shutdown(wait=True, cancel_futures=True)  # after -x or ^C, runs not yet started never start


@pytest.fixture(scope="session")
def cli_runs(background_runs) -> BackgroundRuns:
    """What a test that checks background runs asks for (it runs after the tests that run in this process only)."""
    return background_runs


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
