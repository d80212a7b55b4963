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

Nothing is written until it is known to be good: a checkpoint and the exports are written (atomically) at
the end of each epoch, or when SIGINT/SIGTERM arrives, only after checking that no loss went non-finite.
"""

import itertools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl.checkpoint import atomic_save
from ssl.data import BatchLoader, ViewAugmenter, build_dataset
from ssl.distributed import Process, all_reduce_mean, convert_sync_batchnorm, init_process, shutdown
from ssl.ema import EMA, build_schedule
from ssl.errors import UserError
from ssl.loggers import RunLogger
from ssl.methods import MethodOutput, build_method
from ssl.models import build_backbone, save_export
from ssl.optim import build_optimizer, cosine_schedule, param_groups


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


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume == "auto":
        path = run_dir / "checkpoint.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"resume={resume}: no such checkpoint; pass resume=auto or the path of a checkpoint.pt")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}); pass another resume path") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a training checkpoint (an export? resume takes RUN_DIR/checkpoint.pt)")
    return state


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
    checkpoint_path = run_dir / "checkpoint.pt"
    resume_path = find_resume_checkpoint(cfg.resume, run_dir)
    if resume_path is None and checkpoint_path.exists():
        raise UserError(f"{run_dir} already holds a run (checkpoint.pt); continue it with resume=auto, "
                        "or start a new one with another run_dir")
    device = resolve_device(cfg.device)
    process = init_process(device.type)
    try:
        return _train(cfg, run_dir, checkpoint_path, resume_path, device, process)
    finally:
        shutdown()


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


def _train(cfg: DictConfig, run_dir: Path, checkpoint_path: Path, resume_path: Path | None, device: torch.device,
           process: Process) -> Path:
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    run = build_pretraining(cfg, device, process)
    dataset, method, model, optimizer, ema = run.dataset, run.method, run.model, run.optimizer, run.ema
    epochs, steps_per_epoch = cfg.trainer.epochs, run.steps_per_epoch

    # ---- state: fresh, or restored exactly (weights, optimiser, EMA step, RNG) for a bit-identical continuation
    step = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step = state["step"]
    forward = wrap_forward(model, cfg, device, process)
    logger = None
    if process.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        logger = RunLogger(run_dir, OmegaConf.to_container(cfg.logger), OmegaConf.to_container(cfg, resolve=True),
                           resume=resume_path is not None)
        if resume_path is not None:
            logger.message(f"resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch})")

    def save_checkpoint(epoch_done: int) -> None:
        if not process.is_main:
            return
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict(), "rng": rng, "step": step, "epoch": epoch_done,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, checkpoint_path)
        meta = {"input_size": cfg.data.image_size, "channels": cfg.data.channels, "mean": list(cfg.data.mean),
                "std": list(cfg.data.std), "dataset": cfg.data.name, "num_classes": dataset.num_classes,
                "method": cfg.method.name, "epoch": epoch_done}
        save_export(run_dir / "teacher.pt", method.teacher.backbone, role="teacher", **meta)
        save_export(run_dir / "student.pt", method.student.backbone, role="student", **meta)

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
                                       f"continue with resume=auto run_dir={run_dir}")
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
        kept = f"the last good {checkpoint_path} is kept" if checkpoint_path.exists() else "nothing was saved"
        raise UserError(f"loss became non-finite at step {bad}; stopping ({kept}); "
                        "lower optim.lr, enable trainer.grad_clip, or check the data")
