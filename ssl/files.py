"""Writing files so that failures cannot damage them: the one way the package writes a whole file.

Writes are atomic: a file on disk is either the old complete version or the new complete version, never half, and
files written together (a checkpoint and its exports) are replaced together or not at all. An OS error (a full
disk, a lost permission) leaves no temporary file behind and comes out as an `OSError` naming the file.
"""

import os
import tempfile
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
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            staged.append((Path(tmp), target))
            with os.fdopen(fd, "wb") as handle:
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
