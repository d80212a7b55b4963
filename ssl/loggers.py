"""Where a run's numbers go: `metrics.jsonl` always, wandb when configured, and progress on the terminal.

On a terminal (stderr a TTY) progress is a tqdm bar over the run's optimiser steps, with its ETA; elsewhere (a log
file, a pipe) it is one line per log point. wandb is imported only when used and defaults to offline mode, which
needs no account and no network (`wandb sync RUN_DIR/wandb/...` uploads later); `logger.mode=online` syncs live.
A resumed run continues the same wandb run: its id is kept in the checkpoint.
"""

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ssl.errors import UserError, with_path
from ssl.files import atomic_write_text


class RunLogger:
    """Rank 0's logger. `resumed_at`: the step of the checkpoint a resumed run continues (None: a fresh run);
    `wandb_id`: the wandb run that checkpoint belongs to, continued when wandb is on."""

    def __init__(self, run_dir: Path, logger_cfg: dict[str, Any], config: dict[str, Any],
                 resumed_at: int | None = None, wandb_id: str | None = None) -> None:
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        if resumed_at is not None:
            drop_records_after(self.metrics_path, resumed_at)
        self._file = self.metrics_path.open("w" if resumed_at is None else "a")
        self._interactive = sys.stderr.isatty()
        self._bar: tqdm | None = None
        self._wandb = None
        # Kept (and saved again) by a session without wandb, so a later one with wandb still continues that run.
        self.wandb_id = wandb_id
        if logger_cfg["name"] == "wandb":
            self._wandb = start_wandb(Path(run_dir), logger_cfg, config, run_id=wandb_id)
            self.wandb_id = self._wandb.id
        elif logger_cfg["name"] != "none":
            raise UserError(f"unknown logger {logger_cfg['name']!r}; choose one of: wandb, none")

    def log(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:
            with contextlib.suppress(OSError):
                self._file.close()  # else its unwritten buffer fails again, loudly, when the process exits
            raise with_path(error, self.metrics_path) from None
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    @contextlib.contextmanager
    def progress_bar(self, step: int, epochs: int, steps_per_epoch: int) -> Iterator[None]:
        """While inside, on a terminal: a bar over the run's `epochs * steps_per_epoch` optimiser steps that starts at
        `step` (where a resumed run is), moved by `advance`. It is closed on the way out, an error's too, so what
        follows starts on a line of its own. Elsewhere nothing changes: `progress` prints lines."""
        if self._interactive:
            self._epochs, self._steps_per_epoch = epochs, steps_per_epoch
            self._bar = tqdm(total=epochs * steps_per_epoch, initial=step, unit="step", file=sys.stderr,
                             dynamic_ncols=True, desc=self._epoch_caption(step))
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _epoch_caption(self, step: int) -> str:
        return f"epoch {min(step // self._steps_per_epoch, self._epochs - 1) + 1}/{self._epochs}"

    def advance(self) -> None:
        """One optimiser step done: the bar's count, rate and ETA move (a host-side count: nothing waits for the
        device); the caption turns to the next epoch at its first step."""
        if self._bar is None:
            return
        self._bar.update()
        if self._bar.n % self._steps_per_epoch == 0:
            self._bar.set_description_str(self._epoch_caption(self._bar.n), refresh=False)

    def progress(self, epoch: int, epochs: int, step: int, steps: int, values: dict[str, float]) -> None:
        """At a log point: the values become the bar's postfix, or without a bar one line on stderr."""
        text = " ".join(f"{key}={value:.4g}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            print(f"epoch {epoch + 1}/{epochs} [{step}/{steps}] {text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line on stdout; a bar is lifted off the terminal while it prints, then drawn again below it."""
        with tqdm.external_write_mode(file=sys.stdout) if self._bar is not None else contextlib.nullcontext():
            print(text, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) without the records logged after `step`: a run interrupted after its last
    checkpoint logged steps that its resumed run logs again. A line cut short by a killed process goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def start_wandb(run_dir: Path, logger_cfg: dict[str, Any], config: dict[str, Any], run_id: str | None = None):
    """A wandb run in `run_dir`; with `run_id`, that run continued (created if wandb does not know it)."""
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb but wandb is not installed: `pip install wandb` or pass logger=none") from None
    start = time.monotonic()
    run = wandb.init(project=logger_cfg.get("project", "ssl"), entity=logger_cfg.get("entity"),
                     mode=logger_cfg.get("mode", "offline"), dir=str(run_dir), config=config,
                     name=logger_cfg.get("run_name"), id=run_id, resume="allow" if run_id else None)
    print(f"wandb ({logger_cfg.get('mode', 'offline')}) started in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return run
