"""The command line: what every script here shares (this file), the checks of what a user hands the scripts
(checks.py), example.py's flags (example_args.py), how a script writes what it keeps, whole or not at all
(outputs.py), and the library warnings silenced as a script starts (library_warnings.py). A mistake in the user's
input, or a write that fails, is one line on stderr and exit status 2.

Each script ends with

    if __name__ == "__main__":
        cli.run(main)

and reports a bad argument, file or folder by raising `UsageError` wherever it is found: in its `parse_args`, before
the imports that take seconds, or at the boundary where a library turns down the input. `run` prints it as
`script.py: error: what was wrong and what is accepted`, without a traceback. Ctrl-C, SIGTERM (what `timeout`, a
scheduler or `kill` sends first) and a closed pipe on stdout end the run without one too, and outputs.py leaves
nothing half-written when they, or a full disk, stop a run. Anything else is a bug, and keeps its traceback.
"""

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from cli import library_warnings

OUT_DIR = "out"  # .gitignore lists it: what the scripts write unless told otherwise goes there


def make_out_dir(path: str) -> None:
    """Creates out/ when `path` is a file in it: the scripts' default outputs go there, and a fresh clone has none."""
    if os.path.dirname(os.path.normpath(path)) == OUT_DIR:
        os.makedirs(OUT_DIR, exist_ok=True)


class UsageError(Exception):
    """A mistake in the user's input (an argument, a file, a folder), reported as one line."""


class Terminated(BaseException):
    """SIGTERM, raised where the run is, like Ctrl-C's KeyboardInterrupt: not an Exception, so nothing swallows it."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup of the first
    sys.unraisablehook = _finalizer_after_a_stop
    raise Terminated


def _finalizer_after_a_stop(unraisable: object) -> None:
    """Ignores an error in a finalizer once a run is stopped. The stop is raised wherever the run is, inside a
    constructor too (tqdm's), and the half-built object's __del__ then fails: the stop's doing, not a bug."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """argparse's own errors (a bad number, an unknown choice) in the same one-line form as ours."""
        raise UsageError(f"{message} (see --help)")


def run(main: Callable[[], Any], prog: str | None = None) -> None:
    """Runs a script's `main`; a UsageError becomes `prog: error: message` on stderr and exit status 2. The library
    warnings that are understood and harmless are silenced first (cli/library_warnings.py)."""
    library_warnings.silence()
    prog = prog or os.path.basename(sys.argv[0])
    in_main_thread = threading.current_thread() is threading.main_thread()  # the only thread Python signals
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        main()
    except UsageError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a bug
        sys.unraisablehook = _finalizer_after_a_stop
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:  # exit status 128 + 15, as a shell reports a process that SIGTERM ended
        print(f"{prog}: terminated", file=sys.stderr)
        sys.exit(143)
    except BrokenPipeError:  # whatever read stdout stopped early (`python example.py | head`): stop quietly
        # Python would report the pipe again when it flushes stdout on exit; point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
