"""The training loop shared by every method (BYOL, DINO), to be read top to bottom.

One step: a uint8 batch already on the device -> views (batched augmentation, same code on GPU and CPU)
-> method forward (student, teacher, loss) and the online linear probe on detached teacher features
-> backward -> the method's hook (DINO: last-layer freeze, clipping) -> optimiser step -> EMA teacher update.

Learning rate and weight decay are arrays precomputed for every step, as in DINO; the teacher's decay
schedule lives in `ssl.ema.EMA`. Numbers stay on the device between log points: the host reads them once
every `trainer.log_every` steps, so the step itself never waits for the GPU.

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

from ssl.checkpoint import Resume, atomic_save, atomic_write_text, kept_note, resume_state
from ssl.data import BatchLoader, ViewAugmenter, build_dataset
from ssl.distributed import Process, all_reduce_mean, convert_sync_batchnorm, init_process, shutdown
from ssl.ema import EMA, build_schedule
from ssl.errors import UserError, os_failure
from ssl.loggers import RunLogger
from ssl.methods import MethodOutput, build_method
from ssl.models import build_backbone
from ssl.models.export import export_payload
from ssl.optim import build_optimizer, cosine_schedule, param_groups
from ssl.run_lock import run_lock


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def validate_config(cfg: DictConfig) -> None:
    """Refuse impossible values before any data is read or any file is written."""
    checks = [
        (cfg.trainer.epochs > 0, f"trainer.epochs must be > 0 (got {cfg.trainer.epochs})"),
        (cfg.trainer.warmup_epochs >= 0, f"trainer.warmup_epochs must be >= 0 (got {cfg.trainer.warmup_epochs})"),
        (cfg.data.batch_size > 0, f"data.batch_size must be > 0 (got {cfg.data.batch_size})"),
        (cfg.trainer.log_every > 0, f"trainer.log_every must be > 0 (got {cfg.trainer.log_every})"),
        (cfg.optim.lr > 0, f"optim.lr must be > 0 (got {cfg.optim.lr})"),
        (cfg.data.limit is None or cfg.data.limit > 0, f"data.limit must be > 0 or null (got {cfg.data.limit})"),
    ]
    for key, value in cfg.method.ema.schedule_kwargs.items():
        if isinstance(value, (int, float)) and key not in ("gamma", "power"):
            checks.append((0.0 <= value <= 1.0 and math.isfinite(value),
                           f"method.ema.schedule_kwargs.{key} is a decay and must lie in [0, 1] (got {value})"))
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
    loader = BatchLoader(dataset, cfg.data.batch_size // process.world_size, device, shuffle=True, drop_last=True,
                         seed=cfg.seed, rank=process.rank, world_size=process.world_size)
    augmenter = ViewAugmenter.from_config(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.channels, cfg.seed)

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
    total_steps = cfg.trainer.epochs * steps_per_epoch
    base_lr = cfg.optim.lr * (cfg.data.batch_size / 256 if cfg.optim.scale_lr_by_batch else 1.0)  # global batch
    lr_schedule = cosine_schedule(base_lr, cfg.optim.final_lr * base_lr / cfg.optim.lr, total_steps,
                                  cfg.trainer.warmup_epochs * steps_per_epoch).tolist()
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, wd_end, total_steps).tolist()

    groups = param_groups((n, p) for n, p in method.named_parameters() if not n.startswith("teacher."))
    groups.append({"params": list(model.probe.parameters()), "lr_scale": cfg.optim.probe_lr / base_lr,
                   "wd_scale": 0.0, "lars_exclude": True})
    optimizer = build_optimizer(cfg.optim.name, groups, lr=base_lr, weight_decay=cfg.optim.weight_decay,
                                **OmegaConf.to_container(cfg.optim.kwargs, resolve=True))
    ema_schedule = build_schedule(cfg.method.ema.schedule, total_steps,
                                  **OmegaConf.to_container(cfg.method.ema.schedule_kwargs, resolve=True))
    ema = EMA(method.teacher, ema_schedule, buffers=cfg.method.ema.buffers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=cfg.trainer.precision == "bf16" and device.type == "cuda")
    return Pretraining(dataset, loader, augmenter, method, model, optimizer, ema, lr_schedule, wd_schedule,
                       steps_per_epoch, channels_last, autocast, cfg.trainer.grad_clip)


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


def train_step(run: Pretraining, forward: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               indices: torch.Tensor, epoch: int, step: int,
               mark: Callable[[str], None] = no_mark) -> tuple[MethodOutput, torch.Tensor, torch.Tensor, float]:
    """One optimiser step; returns the method output, probe logits, probe loss and the EMA decay applied.

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
    mark("forward_backward")
    if hasattr(run.method, "before_optimizer_step"):
        run.method.before_optimizer_step(epoch)
    if run.grad_clip:
        trained = [p for group in run.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(trained, run.grad_clip)
    run.optimizer.step()
    mark("optimizer")
    tau = run.ema.update(run.method.student)
    mark("ema")
    return out, probe_logits, probe_loss, tau


def _train(cfg: DictConfig, run_dir: Path, resume: Resume | None, device: torch.device, process: Process) -> Path:
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    run = build_pretraining(cfg, device, process)
    dataset, method, model, optimizer, ema = run.dataset, run.method, run.model, run.optimizer, run.ema
    epochs, steps_per_epoch = cfg.trainer.epochs, run.steps_per_epoch
    checkpoint_path = run_dir / "checkpoint.pt"

    # ---- state: fresh, or restored exactly (weights, optimiser, EMA step, RNG) for a bit-identical continuation
    step = 0 if resume is None else resume.restore(model, optimizer, ema, steps_per_epoch, device)
    forward = wrap_forward(model, cfg, device, process)
    logger = None
    if process.is_main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        logger = RunLogger(run_dir, OmegaConf.to_container(cfg.logger), OmegaConf.to_container(cfg, resolve=True),
                           resume=resume is not None)
        if resume is not None:
            logger.message(f"resumed from {resume.path} at step {step} (epoch {step // steps_per_epoch})")
            for notice in resume.notices:
                logger.message(f"notice: {notice}")

    def save_checkpoint(epoch_done: int) -> None:
        if not process.is_main:
            return
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                      "rng": rng, "step": step, "epoch": epoch_done, "steps_per_epoch": steps_per_epoch,
                      "config": OmegaConf.to_container(cfg, resolve=True)}
        meta = {"input_size": cfg.data.image_size, "channels": cfg.data.channels, "mean": list(cfg.data.mean),
                "std": list(cfg.data.std), "dataset": cfg.data.name, "num_classes": dataset.num_classes,
                "method": cfg.method.name, "epoch": epoch_done}
        # All three or none: the exports always come from the checkpoint's epoch.
        atomic_save({checkpoint_path: checkpoint,
                     run_dir / "teacher.pt": export_payload(method.teacher.backbone, role="teacher", **meta),
                     run_dir / "student.pt": export_payload(method.student.backbone, role="student", **meta)})

    # ---- the loop
    step_on_device = torch.tensor(step, device=device)
    first_bad_step = torch.tensor(-1, device=device)
    log_sums: dict[str, torch.Tensor] = {}
    epoch_sums: dict[str, torch.Tensor] = {}
    images_since_log, last_log_step, clock = 0, step, time.perf_counter()
    with StopOnSignal() as stop:
        for epoch in range(step // steps_per_epoch, epochs):
            method.train()
            batches = itertools.islice(run.loader.epoch(epoch), step - epoch * steps_per_epoch, None)
            for images, labels, indices in batches:
                out, probe_logits, probe_loss, tau = train_step(run, forward, images, labels, indices, epoch, step)

                # bookkeeping on the device: no host synchronisation here
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(out.loss), step_on_device,
                                             first_bad_step)
                step_on_device += 1
                labelled = labels >= 0
                probe_correct = ((probe_logits.argmax(1) == labels) & labelled).sum()
                values = {"loss": out.loss.detach().float(), "probe_loss": probe_loss.detach(),
                          "probe_acc": probe_correct / labelled.sum().clamp(min=1),
                          **{key: value.float() for key, value in out.logs.items()}}
                for sums in (log_sums, epoch_sums):
                    for key, value in values.items():
                        sums[key] = sums[key] + value if key in sums else value.clone()
                step += 1
                images_since_log += images.shape[0]

                # A single process reacts to a signal at once; ranks agree on stopping at log points only.
                stopping = stop.signal_name is not None and not process.distributed
                if step % cfg.trainer.log_every == 0 or stopping:
                    stopping = agree_to_stop(stop.signal_name is not None, device) if process.distributed else stopping
                    check_finite(first_bad_step, checkpoint_path)
                    means = mean_over_processes(log_sums, step - last_log_step)
                    elapsed = time.perf_counter() - clock
                    record = {**means, "step": step, "epoch": epoch, "lr": run.lr_schedule[step - 1], "tau": tau,
                              "images_per_s": images_since_log * process.world_size / elapsed}
                    if logger is not None:
                        logger.log(record)
                        logger.progress(epoch, epochs, step - epoch * steps_per_epoch, steps_per_epoch,
                                        {k: record[k] for k in ("loss", "probe_acc", "lr", "tau", "images_per_s")})
                    log_sums, images_since_log, last_log_step, clock = {}, 0, step, time.perf_counter()
                if stopping:
                    save_checkpoint(epoch)
                    if logger is not None:
                        logger.message(f"{stop.signal_name or 'signal'}: saved {checkpoint_path} at step {step}; "
                                       f"continue with: {resume_command(run_dir, distributed=process.distributed)}")
                        logger.close()
                    raise KeyboardInterrupt

            check_finite(first_bad_step, checkpoint_path)
            record = mean_over_processes(epoch_sums, steps_per_epoch)
            epoch_sums = {}
            save_checkpoint(epoch + 1)
            if logger is not None:
                logger.log({"step": step, "epoch": epoch + 1, "type": "epoch", **record})
                logger.message(f"epoch {epoch + 1}/{epochs}: loss={record['loss']:.4f} "
                               f"probe_acc={record['probe_acc']:.4f}")

    teacher_path = run_dir / "teacher.pt"
    if logger is not None:
        logger.close()
        print(f"teacher backbone: {teacher_path}\nlinear evaluation: python -m ssl.linear_eval ckpt={teacher_path}")
    return teacher_path


def mean_over_processes(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Per-step means of the accumulated values, averaged over processes: one host read for all of them."""
    if not sums:
        return {}
    means = all_reduce_mean(torch.stack(list(sums.values())) / count).tolist()
    return dict(zip(sums, means))


def agree_to_stop(requested: bool, device: torch.device) -> bool:
    """True on every rank when any rank received SIGINT/SIGTERM (so all stop at the same step)."""
    flag = torch.tensor(float(requested), device=device)
    return bool(all_reduce_mean(flag).item() > 0)


def check_finite(first_bad_step: torch.Tensor, checkpoint_path: Path) -> None:
    bad = int(first_bad_step.item())
    if bad >= 0:
        raise UserError(f"loss became non-finite at step {bad}; stopping ({kept_note(checkpoint_path)}); "
                        "lower optim.lr, enable trainer.grad_clip, or check the data")
