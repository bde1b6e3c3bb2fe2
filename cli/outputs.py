"""Writing what a run keeps: a folder or a file appears at its path whole, or not at all.

Every writer writes into a new temporary folder or file beside its target, under a hidden name
(`.NAME-partial-XXXXXXXX`), and claims the target at the end with one step the file system takes atomically:
- a folder is renamed onto its path. rename(2) replaces nothing but an empty folder: when another run has put a
  folder with files there meanwhile, the rename fails and that folder stays as it was (with --overwrite, each new
  file replaces its namesake in the folder instead, one rename a file, and the other files stay);
- a new file is hard-linked to its path, which fails when anything is there (link(2) never replaces), and the
  temporary name is removed; a file made to be replaced (a chart, the default recipe) is renamed over the old one.
Every file is flushed to the disk (fsync) before its name is claimed, and the folder that holds the name after.
The run that loses, a write that fails (a full disk, a folder made read-only or removed meanwhile) and an
interruption (Ctrl-C, or SIGTERM, which cli.run turns into one) remove the temporary copy and any folder made for
it: the losing run and the failed write end as one line and exit status 2 (UsageError), and nothing half-written is
left where a later run would read it. Only what Python never sees (SIGKILL, a power cut) can leave a temporary
copy, under its hidden name, which no script reads.
"""

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from cli import UsageError

# What rename(2) and link(2) say when the target is there: a file, or a folder with files in it.
TAKEN = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)
# The writers written in Rust (safetensors, tokenizers) raise a failed write as a plain Exception that ends with it.
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class TargetTaken(Exception):
    """The target appeared while this run wrote its copy."""


@contextmanager
def output_folder(path: str, flag: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a new empty folder to write into; when the block ends, the folder becomes `path` (or, with
    `overwrite`, its files replace their namesakes in `path`). Errors are UsageErrors naming `flag` and `path`."""
    target = os.path.realpath(path)  # a link to a folder: the folder it points to
    with _temporary_beside(target, path, flag, folder=True) as temp:
        yield temp
        _claim_folder(temp, target, overwrite)


@contextmanager
def output_file(path: str, flag: str, replace: bool = False) -> Iterator[str]:
    """Yields a new empty file's path, with `path`'s extension, to write; when the block ends, it becomes `path`:
    a new file, or with `replace` whatever was there is replaced. Errors are UsageErrors naming `flag` and `path`."""
    target = os.path.realpath(path)
    with _temporary_beside(target, path, flag, folder=False) as temp:
        yield temp
        _set_mode(temp, 0o666)
        _sync(temp)
        try:
            if replace:
                os.replace(temp, target)
            else:
                os.link(temp, target)
                os.unlink(temp)
        except OSError as error:
            if error.errno in TAKEN:
                raise TargetTaken from None
            raise
        _sync_folder(os.path.dirname(target))


@contextmanager
def _temporary_beside(target: str, path: str, flag: str, folder: bool) -> Iterator[str]:
    """A temporary folder or file in `target`'s folder (made, with its parents, if missing), removed with those
    parents when the block fails; OSError and TargetTaken become one-line UsageErrors."""
    parent = os.path.dirname(target)
    made = []  # the folders made for the target, deepest first
    temp = None
    try:
        while not os.path.isdir(parent):
            made.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        root, extension = (os.path.basename(target), "") if folder else os.path.splitext(os.path.basename(target))
        prefix = f".{root}-partial-"
        if folder:
            temp = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(target))
        else:
            handle, temp = tempfile.mkstemp(prefix=prefix, suffix=extension, dir=os.path.dirname(target))
            os.close(handle)
        yield temp
    except BaseException as error:
        _remove(temp, made)
        if isinstance(error, TargetTaken):
            raise UsageError(
                f"{flag} {path} was written by another run while this one worked: it is left as that run wrote it; "
                "name a new one"
            ) from None
        reason = write_failure(error)
        if reason is not None:
            raise UsageError(f"cannot write {flag} {path}: {reason}; nothing was written") from None
        raise


def write_failure(error: BaseException) -> str | None:
    """Why a write failed (a full disk: "No space left on device"), or None for an error that is not the file
    system's."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    found = RUST_OS_ERROR.search(str(error)) if isinstance(error, Exception) else None
    return os.strerror(int(found.group(1))) if found else None


def _claim_folder(temp: str, target: str, overwrite: bool) -> None:
    _set_mode(temp, 0o777)
    for folder, folders, files in os.walk(temp):
        for name in folders:
            _set_mode(os.path.join(folder, name), 0o777)
            _sync_folder(os.path.join(folder, name))
        for name in files:
            _set_mode(os.path.join(folder, name), 0o666)
            _sync(os.path.join(folder, name))
    _sync_folder(temp)
    if overwrite and os.path.isdir(target) and os.listdir(target):
        for name in os.listdir(temp):
            os.replace(os.path.join(temp, name), os.path.join(target, name))
        os.rmdir(temp)
        _sync_folder(target)
        return
    try:
        os.rename(temp, target)
    except OSError as error:
        if error.errno in TAKEN:
            raise TargetTaken from None
        raise
    _sync_folder(os.path.dirname(target))


def _sync(path: str) -> None:
    """Makes the disk hold the file before it is claimed: after a power cut, a claimed name must not show a file
    that was never written, and some file systems report a full disk only here."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_folder(path: str) -> None:
    """The same for a folder's entries (the names a rename made); some file systems cannot, which is no error."""
    try:
        _sync(path)
    except OSError:
        pass


def _set_mode(path: str, mode: int) -> None:
    """The mode a new file (0o666) or folder (0o777) gets under the umask: mkstemp and mkdtemp make them the
    owner's alone, and so do some writers (safetensors)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _remove(temp: str | None, made: list[str]) -> None:
    if temp is not None and os.path.isdir(temp):
        shutil.rmtree(temp, ignore_errors=True)
    elif temp is not None and os.path.lexists(temp):
        try:
            os.unlink(temp)
        except OSError:
            pass
    for folder in made:  # deepest first; one that another run has put files in meanwhile stays
        try:
            os.rmdir(folder)
        except OSError:
            break
