"""Writing files so that failures cannot damage them: the one way the package writes a whole file.

Writes are atomic: a file on disk is either the old complete version or the new complete version, never half, and
files written together (a checkpoint and its exports) are replaced together or not at all. An OS error (a full
disk, a lost permission) leaves no temporary file behind and comes out as an `OSError` naming the file.

A new file gets the permissions any other program would give it (0666 less the process umask, 0644 under the usual
022), so a teammate or a serving process can read what a run exports; a replaced file keeps its mode.
"""

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ssl.errors import is_system_error, with_path


def atomic_write(writers: Mapping[str | os.PathLike, Callable[[BinaryIO], object]]) -> None:
    """Call each writer on a temporary file beside its path and fsync it; once all are written, rename each over
    its path. On any failure the temporary files are removed and every existing file is left as it was.

    OS errors are raised as `OSError` naming the file being written: torch's zip writer buries a failed write under
    its own second error, and a failed `write()` names no file.
    """
    staged: list[tuple[Path, Path]] = []  # (temporary, final)
    target = Path()  # the file being written, then renamed: the one a failure is about
    try:
        for target, write in ((Path(path), write) for path, write in writers.items()):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp, kept_mode = _create_beside(target)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                if kept_mode is not None and stat.S_IMODE(os.fstat(fd).st_mode) != kept_mode:
                    os.fchmod(fd, kept_mode)  # the umask took bits off the mode it was created with
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException as error:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        cause = _os_error_in(error)
        if cause is None:
            raise
        raise with_path(cause, target) from None


def _create_beside(target: Path) -> tuple[int, Path, int | None]:
    """A new empty file `.<name>.<random>.tmp` beside `target`, open for writing, and the mode of the file it
    replaces (None when there is none).

    Created as `open()` creates files, 0666 less the umask (the kernel takes it off, and applies a folder's default
    ACL), or with the replaced file's mode less the umask: `tempfile.mkstemp` would make it 0600, which the rename
    keeps. The new contents are thus never more readable than the file they become.
    """
    try:
        status = os.stat(target)
        kept_mode = stat.S_IMODE(status.st_mode) if stat.S_ISREG(status.st_mode) else None
    except FileNotFoundError:
        kept_mode = None
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         0o666 if kept_mode is None else kept_mode & 0o777)
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
        return fd, tmp, kept_mode


def _os_error_in(error: BaseException) -> OSError | None:
    """The OS error that `error` is or was raised while handling (only for `Exception`s: Ctrl-C stays Ctrl-C)."""
    cause: BaseException | None = error
    while isinstance(cause, Exception) and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause if is_system_error(cause) else None


def atomic_save(objects: Mapping[str | os.PathLike, Any]) -> None:
    """`torch.save` each object to its path, all or none (see `atomic_write`)."""
    atomic_write({path: partial(torch.save, obj) for path, obj in objects.items()})


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write({path: lambda handle: handle.write(text.encode())})
    return Path(path)
