"""RunLogger: one progress line per log point off a terminal, a tqdm bar on one; a resumed run's metrics.jsonl without
the records its checkpoint does not back; the same wandb run continued by resume=auto (offline, no network)."""

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from ssl.loggers import RunLogger
from tests.fixtures import run_module, write_fmnist
from tests.test_pretrain import step_losses, tiny

VALUES = {"loss": 0.5, "probe_acc": 0.25, "lr": 0.01, "tau": 0.99, "images_per_s": 1234.0}
POSTFIX = "loss=0.5 probe_acc=0.25 lr=0.01 tau=0.99 images_per_s=1234"


class Terminal(io.StringIO):
    """What a terminal would show, kept as written (carriage returns and all)."""

    def isatty(self) -> bool:
        return True


def log_one_epoch(logger: RunLogger, start: int) -> None:
    """Steps `start`+1 .. 6 of a 3-epoch run of 6 steps per epoch, one log point at step 6, then the epoch's line."""
    with logger.progress_bar(start, epochs=3, steps_per_epoch=6):
        for _ in range(start, 6):
            logger.advance()
        logger.progress(0, 3, 6, 6, VALUES)
        logger.message("epoch 1/3: loss=0.5000 probe_acc=0.2500")


def test_off_a_terminal_each_log_point_prints_one_line(tmp_path, capsys):
    logger = RunLogger(tmp_path, {"name": "none"}, {})
    log_one_epoch(logger, start=0)
    logger.close()
    out, err = capsys.readouterr()
    assert err == f"epoch 1/3 [6/6] {POSTFIX}\n"
    assert out == "epoch 1/3: loss=0.5000 probe_acc=0.2500\n"


def test_on_a_terminal_a_bar_shows_the_eta_and_the_last_log_point(tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    logger = RunLogger(tmp_path, {"name": "none"}, {})
    log_one_epoch(logger, start=2)  # resumed at step 2: the bar starts there
    logger.close()
    frames = terminal.getvalue().split("\r")
    assert frames[1].startswith("epoch 1/3:  11%|") and "| 2/18 [" in frames[1]
    last = frames[-1]
    assert last.startswith("epoch 2/3:  33%|") and "| 6/18 [" in last  # the next step is epoch 2's first
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+step/s, " + re.escape(POSTFIX) + r"\]\n$", last), last
    assert "[6/6]" not in terminal.getvalue()  # no progress lines under a bar
    assert capsys.readouterr().out == "epoch 1/3: loss=0.5000 probe_acc=0.2500\n"  # the message prints whole


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_the_records_logged_after_the_checkpoint(tmp_path):
    logged = [{"step": step, "loss": 1.0 / step} for step in range(1, 9)]
    logged.insert(6, {"step": 6, "epoch": 1, "type": "epoch", "loss": 0.3})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in logged) + '{"step": 9, "lo')  # cut short by a kill
    logger = RunLogger(tmp_path, {"name": "none"}, {}, resumed_at=6)
    logger.log({"step": 7, "loss": 0.7})
    logger.close()
    assert records(metrics) == [*logged[:7], {"step": 7, "loss": 0.7}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # rewritten in place, no temporary left


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fmnist(tmp_path_factory.mktemp("data"), train=96, test=32)


def test_resume_auto_continues_the_same_wandb_run(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name))
    run = tmp_path / "run"
    args = [arg for arg in tiny(data_root, run, "trainer.epochs=1", "trainer.knn_every_epochs=0")
            if arg != "logger=none"]
    # both sessions are `python -m ssl.pretrain` in this process (`run_module`), wandb offline
    assert run_module("ssl.pretrain", *args, "logger=wandb") == 0
    run_id = torch.load(run / "checkpoint.pt", weights_only=True)["wandb_id"]
    assert run_id
    with (run / "metrics.jsonl").open("a") as metrics:  # logged after the checkpoint by a run then interrupted
        metrics.write(json.dumps({"step": 7, "loss": 123.0}) + "\n")

    assert run_module("ssl.pretrain", *args, "logger=wandb", "resume=auto", "trainer.epochs=2") == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["wandb_id"] == run_id
    folders = sorted(path.name for path in (run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(name.endswith(f"-{run_id}") for name in folders), folders
    steps = [r["step"] for r in records(run / "metrics.jsonl") if r.get("type") != "epoch"]
    assert steps == list(range(1, 13)) and step_losses(run)[7] != 123.0
