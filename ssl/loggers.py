"""Where a run's numbers go: `metrics.jsonl` always, wandb when configured, and a progress line on the terminal.

wandb is imported only when used and defaults to offline mode, which needs no account and no network
(`wandb sync RUN_DIR/wandb/...` uploads later); `logger.mode=online` syncs live.
"""

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from ssl.errors import UserError, with_path


class RunLogger:
    def __init__(self, run_dir: Path, logger_cfg: dict[str, Any], config: dict[str, Any], resume: bool) -> None:
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self._file = self.metrics_path.open("a" if resume else "w")
        self._wandb = None
        self._interactive = sys.stderr.isatty()
        if logger_cfg["name"] == "wandb":
            self._wandb = start_wandb(Path(run_dir), logger_cfg, config)
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

    def progress(self, epoch: int, epochs: int, step: int, steps: int, values: dict[str, float]) -> None:
        text = " ".join(f"{key}={value:.4g}" for key, value in values.items())
        line = f"epoch {epoch + 1}/{epochs} [{step}/{steps}] {text}"
        if self._interactive:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self._interactive:
            print(file=sys.stderr)
        print(text, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(run_dir: Path, logger_cfg: dict[str, Any], config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        raise UserError("logger=wandb but wandb is not installed: `pip install wandb` or pass logger=none") from None
    start = time.monotonic()
    run = wandb.init(project=logger_cfg.get("project", "ssl"), entity=logger_cfg.get("entity"),
                     mode=logger_cfg.get("mode", "offline"), dir=str(run_dir), config=config,
                     name=logger_cfg.get("run_name"))
    print(f"wandb ({logger_cfg.get('mode', 'offline')}) started in {time.monotonic() - start:.1f}s", file=sys.stderr)
    return run
