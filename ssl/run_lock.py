"""One run per folder: a run holds `run_dir/.lock` from start to end, so a second run started on the same folder,
which would interleave its checkpoints and metrics with the first one's, refuses in one line.

The lock is a `flock` on that file, which the kernel drops when the holding process ends in any way (kill -9
included): a lock is live exactly while its process is. The file also says who holds it, for the refusal and for the
notice when a run finds the file of a run that is gone and takes it over.
"""

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssl.errors import UserError

LOCK_NAME = ".lock"
# Some network file systems have no flock (Lustre mounted without -o flock): run unguarded rather than not at all.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Create `run_dir` and hold its lock for the body; a `UserError` when a live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            # Unlinked before it is unlocked: a run that opened it meanwhile sees it is gone and locks a new one.
            path.unlink(missing_ok=True)
            os.close(fd)


def _acquire(path: Path) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as open() creates files
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "a process that is starting"
            os.close(fd)
            raise UserError(f"run_dir {path.parent} is in use by a live run ({holder}); wait for it to end or stop "
                            "it, or choose another run_dir") from None
        except OSError as error:
            os.close(fd)
            if error.errno not in NO_LOCKS:
                raise
            print(f"notice: {path.parent} is on a file system without locks ({error.strerror}); nothing stops a "
                  "second run from using it at the same time", flush=True)
            return None
        if _is_current(fd, path):
            break
        os.close(fd)
    previous = _holder(fd)
    if previous:
        print(f"notice: taking over the lock of {path.parent} from a run that is gone ({previous})", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


def _is_current(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (its holder may have removed it between our open and our lock)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
