"""The training loop shared by every method (BYOL, DINO), to be read top to bottom.

One step: a uint8 batch already on the device -> views (batched augmentation, same code on GPU and CPU)
-> method forward (student, teacher, loss) and the online linear probe on detached teacher features
-> backward -> the method's hook (DINO: last-layer freeze, clipping) -> optimiser step -> EMA teacher update.

Learning rate, weight decay and the teacher's momentum are arrays precomputed for every step from one cosine
(`ssl.optim.cosine_schedule`), as in DINO; `ssl.ema.EMA` applies the momentum. Numbers stay on the device between
log points: the host reads them once every `trainer.log_every` steps, so the step itself never waits for the GPU
(on a terminal the progress bar advances every step and shows the numbers read at log points). After each epoch
an online kNN monitor classifies a fixed test slice with the teacher's features (`ssl.eval.knn_monitor`).

Under torchrun every process runs this same loop on its shard of each global batch. DDP synchronises the
gradients of everything trained (student, predictor, probe); the teacher has no gradients, so DDP leaves it
alone and every rank moves it with `ssl.ema` after the identical optimiser step: teachers stay identical without
communication. Rank 0 alone logs and writes files.

Nothing is written until it is known to be good: a checkpoint and the exports are written (atomically, all three
or none) at the end of each epoch, or when SIGINT/SIGTERM arrives, only after checking that no loss went non-finite.
What stops a run from outside the code (device memory, the file system) ends in one line that says what is kept and
how to continue (`reported_failures`); a run refuses a folder another live run holds (`ssl.run_lock`).
"""

import itertools
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl.checkpoint import Resume, kept_note, resume_state, save_checkpoint
from ssl.data import BatchLoader, ViewAugmenter, build_dataset
from ssl.device import autocast, resolve_device
from ssl.distributed import Process, all_reduce_mean, convert_sync_batchnorm, init_process, shutdown
from ssl.ema import EMA
from ssl.errors import UserError, os_failure
from ssl.eval.knn_monitor import build_knn_monitor
from ssl.files import atomic_write_text
from ssl.loggers import RunLogger
from ssl.methods import build_method
from ssl.models import build_backbone
from ssl.optim import build_optimizer, cosine_schedule, param_groups
from ssl.run_lock import run_lock


def validate_config(cfg: DictConfig) -> None:
    """Refuse impossible values before any data is read or any file is written."""
    checks = [
        (cfg.trainer.epochs > 0, f"trainer.epochs must be > 0 (got {cfg.trainer.epochs})"),
        (cfg.trainer.warmup_epochs >= 0, f"trainer.warmup_epochs must be >= 0 (got {cfg.trainer.warmup_epochs})"),
        (cfg.data.batch_size > 0, f"data.batch_size must be > 0 (got {cfg.data.batch_size})"),
        (cfg.trainer.log_every > 0, f"trainer.log_every must be > 0 (got {cfg.trainer.log_every})"),
        (cfg.trainer.knn_every_epochs >= 0,
         f"trainer.knn_every_epochs must be >= 0, 0 for no online kNN (got {cfg.trainer.knn_every_epochs})"),
        (cfg.trainer.knn_train_images > 0,
         f"trainer.knn_train_images must be > 0 (got {cfg.trainer.knn_train_images})"),
        (cfg.trainer.knn_test_images > 0, f"trainer.knn_test_images must be > 0 (got {cfg.trainer.knn_test_images})"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0 (got {cfg.optim.lr})"),
        (cfg.data.limit is None or cfg.data.limit > 0, f"data.limit must be > 0 or null (got {cfg.data.limit})"),
    ]
    for key in ("base", "end"):
        value = cfg.method.ema[key]
        checks.append((isinstance(value, (int, float)) and 0.0 <= value <= 1.0 and math.isfinite(value),
                       f"method.ema.{key} is a decay and must lie in [0, 1] (got {value})"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can checkpoint and exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __enter__(self) -> "StopOnSignal":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class OnlineProbe(nn.Module):
    """The method plus a linear classifier on its detached teacher features: the one module DDP wraps."""

    def __init__(self, method: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.method = method
        self.probe = nn.Linear(method.student.backbone.feature_dim, num_classes)

    def forward(self, views: list[torch.Tensor], epoch: int) -> tuple[Any, torch.Tensor]:
        out = self.method(views, epoch)
        return out, self.probe(out.teacher_features)


def train(cfg: DictConfig) -> Path:
    """Pretrain `cfg.method` and return the path of the exported teacher backbone."""
    validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.device)
    if device.index is not None:  # cuda:N: the current device, which the run uses (torchrun: the local rank's)
        torch.cuda.set_device(device)
    process = init_process(device.type)
    try:
        # Rank 0 alone writes run_dir, so it alone holds the lock (which also creates run_dir).
        with (reported_failures(cfg, run_dir, process),
              run_lock(run_dir) if process.is_main else nullcontext()):
            resume = resume_state(OmegaConf.to_container(cfg, resolve=True), run_dir)
            return _train(cfg, run_dir, resume, device, process)
    finally:
        shutdown()


def resume_command(run_dir: Path, *overrides: str, distributed: bool = False) -> str:
    """The command that continues the run in `run_dir`: this run's overrides (when Hydra parsed a command line),
    replaced by `overrides` where they name the same key, with resume=auto."""
    try:
        given = list(HydraConfig.get().overrides.task)
    except ValueError:  # train() called from Python: only the caller knows its overrides
        given = ["..."]
    replaced = {_key(o) for o in (*overrides, "resume=", "run_dir=")}
    launcher = ["torchrun", "...", "-m"] if distributed else ["python", "-m"]
    return shlex.join([*launcher, "ssl.pretrain", *(o for o in given if _key(o) not in replaced), *overrides,
                       "resume=auto", f"run_dir={run_dir}"])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def how_to_continue(run_dir: Path, *overrides: str, distributed: bool = False) -> str:
    """What a failed run leaves and the command that continues it (or starts it again, when nothing was saved)."""
    checkpoint = run_dir / "checkpoint.pt"
    verb = "continue" if checkpoint.exists() else "start again"
    return f"{kept_note(checkpoint)}; {verb} with: {resume_command(run_dir, *overrides, distributed=distributed)}"


@contextmanager
def reported_failures(cfg: DictConfig, run_dir: Path, process: Process) -> Iterator[None]:
    """What ends a run from outside the code (device memory, the file system) becomes one line saying what is kept
    and how to continue; anything else is a bug and is re-raised, after saying the same, so no work is lost
    silently. Checkpoints are written only at the end of an epoch (or on a signal), so the last one is good."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        per_process = cfg.data.batch_size // process.world_size
        smaller = max(1, per_process // 2) * process.world_size
        processes = f"{process.world_size} process{'es' if process.distributed else ''}"
        raise UserError(f"out of GPU memory with {per_process} images per process (data.batch_size="
                        f"{cfg.data.batch_size} on {processes}): try data.batch_size={smaller}; "
                        f"{how_to_continue(run_dir, f'data.batch_size={smaller}', distributed=process.distributed)}"
                        ) from None
    except OSError as error:
        raise os_failure(error, then=how_to_continue(run_dir, distributed=process.distributed)) from None
    except UserError:
        raise
    except Exception as error:
        print(f"error: unexpected {type(error).__name__} (the traceback follows); "
              f"{how_to_continue(run_dir, distributed=process.distributed)}", file=sys.stderr, flush=True)
        raise


@dataclass
class Pretraining:
    """Everything one run trains with, built from the config by `build_pretraining`."""

    dataset: Any
    loader: BatchLoader
    augmenter: ViewAugmenter
    method: nn.Module
    model: OnlineProbe
    optimizer: torch.optim.Optimizer
    ema: EMA
    lr_schedule: list[float]
    wd_schedule: list[float]
    steps_per_epoch: int
    channels_last: bool
    autocast: torch.autocast
    grad_clip: float | None


def base_learning_rate(cfg: DictConfig) -> float:
    """`optim.lr`, times the global batch / 256 when `optim.scale_lr_by_batch` (the linear scaling rule of DINO,
    BYOL and solo-learn)."""
    return cfg.optim.lr * (cfg.data.batch_size / 256 if cfg.optim.scale_lr_by_batch else 1.0)


def step_schedules(cfg: DictConfig, steps_per_epoch: int) -> tuple[list[float], list[float], list[float]]:
    """The learning rate, weight decay and teacher momentum of every optimiser step, each a `cosine_schedule`
    as main_dino.py builds them: the lr warmed up over `trainer.warmup_epochs` to `base_learning_rate(cfg)`, then
    towards `optim.final_lr` as given (not scaled by the batch size: DINO's `--min_lr` and solo-learn's
    `scheduler.min_lr` are not); the weight decay from `optim.weight_decay` to
    `optim.weight_decay_end`; the momentum from `method.ema.base` to `method.ema.end`."""
    total_steps = cfg.trainer.epochs * steps_per_epoch
    lr = cosine_schedule(base_learning_rate(cfg), cfg.optim.final_lr, total_steps,
                         cfg.trainer.warmup_epochs * steps_per_epoch)
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd = cosine_schedule(cfg.optim.weight_decay, wd_end, total_steps)
    momentum = cosine_schedule(cfg.method.ema.base, cfg.method.ema.end, total_steps)
    return lr.tolist(), wd.tolist(), momentum.tolist()


def build_pretraining(cfg: DictConfig, device: torch.device, process: Process | None = None) -> Pretraining:
    """Data, views, model, optimiser, schedules and EMA for `cfg`, on `device`, for this process's shard."""
    process = process or Process()
    if cfg.data.batch_size % process.world_size:
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not split evenly over "
                        f"{process.world_size} processes; pick a multiple of {process.world_size}")
    torch.manual_seed(cfg.seed)

    # ---- data: uint8 images resident on the device (or streamed from an image folder), views made per batch;
    # data.batch_size is the global batch, each rank takes its slice of every global batch
    dataset = build_dataset(cfg.data, cfg.data.pretrain_split)
    augmenter = ViewAugmenter.from_config(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.channels, cfg.seed)
    # an image folder's workers cut each view from the whole image with the augmenter's crop boxes
    loader = BatchLoader(dataset, cfg.data.batch_size // process.world_size, device, shuffle=True, drop_last=True,
                         seed=cfg.seed, rank=process.rank, world_size=process.world_size, views=augmenter.views)

    # ---- model: backbone inside the method (student, teacher, heads) and an online linear probe
    backbone_kwargs = {"in_channels": cfg.data.channels, **OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)}
    backbone = build_backbone(cfg.backbone.name, **backbone_kwargs)
    method = build_method(cfg.method.name, backbone, epochs=cfg.trainer.epochs,
                          **OmegaConf.to_container(cfg.method.kwargs, resolve=True))
    if process.distributed and cfg.method.sync_batchnorm:
        method = convert_sync_batchnorm(method, device.type)
    model = OnlineProbe(method, dataset.num_classes).to(device)
    channels_last = cfg.trainer.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)

    # ---- schedules: one value per optimiser step
    steps_per_epoch = len(loader)
    base_lr = base_learning_rate(cfg)
    lr_schedule, wd_schedule, ema_decays = step_schedules(cfg, steps_per_epoch)

    groups = param_groups((n, p) for n, p in method.named_parameters() if not n.startswith("teacher."))
    groups.append({"params": list(model.probe.parameters()), "lr_scale": cfg.optim.probe_lr / base_lr,
                   "wd_scale": 0.0, "lars_exclude": True})
    optimizer = build_optimizer(cfg.optim.name, groups, lr=base_lr, weight_decay=cfg.optim.weight_decay,
                                **OmegaConf.to_container(cfg.optim.kwargs, resolve=True))
    ema = EMA(method.teacher, method.student, ema_decays, buffers=cfg.method.ema.buffers)
    return Pretraining(dataset, loader, augmenter, method, model, optimizer, ema, lr_schedule, wd_schedule,
                       steps_per_epoch, channels_last, autocast(device, cfg.trainer.precision == "bf16"),
                       cfg.trainer.grad_clip)


def wrap_forward(model: OnlineProbe, cfg: DictConfig, device: torch.device, process: Process | None = None
                 ) -> nn.Module:
    """What the step calls: the model, inside DDP under torchrun, compiled when `trainer.compile`."""
    forward: nn.Module = model
    if process is not None and process.distributed:
        # Buffers are not broadcast: SyncBatchNorm (or identical computation) keeps them equal on every rank.
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: let cuDNN pick its fastest kernels
    return torch.compile(forward) if cfg.trainer.compile else forward


def no_mark(phase: str) -> None:
    """Default phase marker: training does not time its phases (the throughput benchmark does)."""


def train_step(run: Pretraining, forward: nn.Module, images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor,
               indices: torch.Tensor, epoch: int, step: int,
               mark: Callable[[str], None] = no_mark) -> tuple[dict[str, torch.Tensor], float]:
    """One optimiser step on `images` (a uint8 batch, or an image folder's views already cut: `BatchLoader`); returns
    what to log of it (0-dim tensors, left on the device) and the EMA decay applied.

    `mark(phase)` is called as each phase ends ("augment", "forward_backward", "optimizer", "ema").
    """
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr_schedule[step] * group["lr_scale"]
        group["weight_decay"] = run.wd_schedule[step] * group["wd_scale"]
    views = run.augmenter(images, indices, epoch)
    if run.channels_last:
        views = [view.contiguous(memory_format=torch.channels_last) for view in views]
    mark("augment")
    with run.autocast:
        out, probe_logits = forward(views, epoch)
    probe_loss = F.cross_entropy(probe_logits.float(), labels, ignore_index=-1)
    run.optimizer.zero_grad(set_to_none=True)
    (out.loss + probe_loss).backward()
    labelled = labels >= 0
    values = {"loss": out.loss.detach().float(), "probe_loss": probe_loss.detach(),
              "probe_acc": ((probe_logits.argmax(1) == labels) & labelled).sum() / labelled.sum().clamp(min=1),
              **{key: value.float() for key, value in out.logs.items()}}
    mark("forward_backward")
    run.method.before_optimizer_step(epoch)
    if run.grad_clip:
        trained = [p for group in run.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(trained, run.grad_clip)
    run.optimizer.step()
    mark("optimizer")
    tau = run.ema.update()
    mark("ema")
    return values, tau


def _train(cfg: DictConfig, run_dir: Path, resume: Resume | None, device: torch.device, process: Process) -> Path:
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    run = build_pretraining(cfg, device, process)
    epochs, steps_per_epoch, config = cfg.trainer.epochs, run.steps_per_epoch, OmegaConf.to_container(cfg, resolve=True)
    # fresh, or restored exactly (weights, optimiser, EMA step, RNG) for a bit-identical continuation
    step = 0 if resume is None else resume.restore(run.model, run.optimizer, run.ema, steps_per_epoch, device)
    forward = wrap_forward(run.model, cfg, device, process)
    logger = start_logger(cfg, run_dir, resume, step, steps_per_epoch) if process.is_main else None
    # Rank 0 alone runs the kNN monitor, without collectives: the other ranks wait for it at their next step's
    # gradient all-reduce, as they would if they computed the same number themselves.
    monitor = (build_knn_monitor(cfg, run.dataset, run.loader.batch_size, device, run.autocast, logger.message)
               if process.is_main else None)
    loss_watch, log_means, epoch_means = LossWatch(step, device), RunningMeans(), RunningMeans()
    images_since_log, clock = 0, time.perf_counter()
    bar = logger.progress_bar(step, epochs, steps_per_epoch) if process.is_main else nullcontext()
    with StopOnSignal() as stop, bar:
        for epoch in range(step // steps_per_epoch, epochs):
            run.method.train()
            batches = itertools.islice(run.loader.epoch(epoch), step - epoch * steps_per_epoch, None)
            for images, labels, indices in batches:
                values, tau = train_step(run, forward, images, labels, indices, epoch, step)
                loss_watch.add(values["loss"])
                log_means.add(values)
                epoch_means.add(values)
                step += 1
                images_since_log += len(indices)
                if process.is_main:
                    logger.advance()

                # A single process reacts to a signal at once; ranks agree on stopping at log points only.
                stopping = stop.signal_name is not None and not process.distributed
                if step % cfg.trainer.log_every == 0 or stopping:
                    stopping = agree_to_stop(stop.signal_name is not None, device) if process.distributed else stopping
                    loss_watch.check(run_dir)
                    means = log_means.means()
                    images_per_s = images_since_log * process.world_size / (time.perf_counter() - clock)
                    record = {**means, "step": step, "epoch": epoch, "lr": run.lr_schedule[step - 1], "tau": tau,
                              "images_per_s": images_per_s}
                    if process.is_main:  # rank 0 alone logs and writes files
                        logger.log(record)
                        logger.progress(epoch, epochs, step - epoch * steps_per_epoch, steps_per_epoch,
                                        {k: record[k] for k in ("loss", "probe_acc", "lr", "tau", "images_per_s")})
                    images_since_log, clock = 0, time.perf_counter()
                if stopping:
                    if process.is_main:
                        save_checkpoint(run_dir, run, config, step, epoch, device, logger.wandb_id)
                        logger.message(f"{stop.signal_name or 'signal'}: saved {run_dir / 'checkpoint.pt'} at step "
                                       f"{step}; continue with: "
                                       f"{resume_command(run_dir, distributed=process.distributed)}")
                        logger.close()
                    raise KeyboardInterrupt

            loss_watch.check(run_dir)
            record = epoch_means.means()
            if process.is_main:
                paused = time.perf_counter()
                save_checkpoint(run_dir, run, config, step, epoch + 1, device, logger.wandb_id)
                if monitor is not None:
                    record.update(monitor(run.method.teacher.backbone, epoch + 1))
                logger.log({"step": step, "epoch": epoch + 1, "type": "epoch", **record})
                logger.message(f"epoch {epoch + 1}/{epochs}: " + " ".join(
                    f"{key}={record[key]:.4f}" for key in ("loss", "probe_acc", "knn20") if key in record))
                clock += time.perf_counter() - paused  # images/s measures training, not the checkpoint and the kNN

    if process.is_main:
        logger.close()
        print(f"teacher backbone: {run_dir / 'teacher.pt'}\n"
              f"linear evaluation: python -m ssl.linear_eval ckpt={run_dir / 'teacher.pt'}")
    return run_dir / "teacher.pt"


def start_logger(cfg: DictConfig, run_dir: Path, resume: Resume | None, step: int, steps_per_epoch: int) -> RunLogger:
    """Rank 0's logger, once the run's config.yaml is written; a resumed run says where it goes on and what changed."""
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    logger = RunLogger(run_dir, OmegaConf.to_container(cfg.logger), OmegaConf.to_container(cfg, resolve=True),
                       resumed_at=None if resume is None else resume.state["step"],
                       wandb_id=None if resume is None else resume.state.get("wandb_id"))
    if resume is not None:
        logger.message(f"resumed from {resume.path} at step {step} (epoch {step // steps_per_epoch})")
        for notice in resume.notices:
            logger.message(f"notice: {notice}")
    return logger


class RunningMeans:
    """Per-step means of logged values (0-dim tensors), summed on the device: the host reads them only in `means`."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        """The means since the last call, averaged over processes (one host read for all of them); starts anew."""
        sums, count, self.sums, self.count = self.sums, self.count, {}, 0
        if not sums:
            return {}
        return dict(zip(sums, all_reduce_mean(torch.stack(list(sums.values())) / count).tolist()))


class LossWatch:
    """The first step whose loss is not finite, kept on the device; `check` reads it and stops the run there."""

    def __init__(self, step: int, device: torch.device) -> None:
        self.step, self.first_bad = torch.tensor(step, device=device), torch.tensor(-1, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.step, self.first_bad)
        self.step += 1

    def check(self, run_dir: Path) -> None:
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise UserError(f"loss became non-finite at step {bad}; stopping ({kept_note(run_dir / 'checkpoint.pt')}); "
                            "lower optim.lr, enable trainer.grad_clip, or check the data")


def agree_to_stop(requested: bool, device: torch.device) -> bool:
    """True on every rank when any rank received SIGINT/SIGTERM (so all stop at the same step)."""
    flag = torch.tensor(float(requested), device=device)
    return bool(all_reduce_mean(flag).item() > 0)
