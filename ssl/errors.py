"""User-facing errors: bad input and failures of the machine (a full disk, a file where a folder should be) are
reported as one line naming the problem and the fix, never a traceback."""

import difflib
import errno
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad user input, or a failure of the machine: the message names the problem and the fix."""


def is_system_error(error: BaseException | None) -> bool:
    """An OS error of the machine (a full disk, a permission); libraries such as PIL and gzip also raise OSErrors,
    without an errno, for bad file contents."""
    return isinstance(error, OSError) and error.errno is not None


def with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` naming `path`: a failed `write()` or `flush()` names no file, and the error line should."""
    return OSError(error.errno, error.strerror, os.fspath(path))  # OSError(errno, ...) picks the subclass


_ADVICE = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your quota",
    errno.EACCES: "fix its permissions or use another location",
    errno.EPERM: "fix its permissions or use another location",
    errno.EROFS: "use a writable location",
    errno.EISDIR: "a folder stands where a file is needed: move it away",
    errno.ENOENT: "check that it exists",
    errno.EIO: "the disk reported an I/O error: check it",
    errno.ENAMETOOLONG: "use a shorter path",
}


def os_failure(error: OSError, path: str | os.PathLike | None = None, then: str = "") -> UserError:
    """One line for a failed file-system operation: `PATH: reason (ERRNO); what to do[; then]`.

    `path` defaults to the file the error names; `then` adds what the caller knows (what is kept, how to go on).
    """
    path = path if path is not None else error.filename
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno, "")
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(Path(path)) if path is not None else None
        advice = f"{blocker or 'a file'} stands where a folder is needed: move it away"
    else:
        advice = _ADVICE.get(error.errno, "check the path and the disk")
    where = f"{os.fspath(path)}: " if path is not None else ""
    return UserError(f"{where}{reason}{f' ({code})' if code else ''}; {advice}{f'; {then}' if then else ''}")


def _blocking_file(path: Path) -> Path | None:
    """The nearest of `path` and its parents that exists; None when that one is a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def refuse_unknown_arguments(owner: str, given: Iterable[str], accepted: Iterable[str], settable_in: str) -> None:
    """One line naming exactly the `given` names that `owner` does not take, each with the accepted name it is
    closest to when one is close (a misspelling), and the names it does take, which `settable_in` may set."""
    accepted = sorted(accepted)
    refused = sorted(set(given) - set(accepted))
    if not refused:
        return
    named = []
    for name in refused:
        close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.7)  # 0.6 offers width for depth
        named.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise UserError(f"{owner} does not take {', '.join(named)}; {settable_in} may set {', '.join(accepted)}")


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; a `UserError`, an `OSError` (or Ctrl-C) ends the process with one line on stderr."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # the machine, not the code (a full disk, a permission); the error names its file
        print(f"error: {os_failure(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
