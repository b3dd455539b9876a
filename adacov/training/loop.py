"""The training loop every experiment runs through: ``train(cfg)`` for a composed Hydra config."""

from __future__ import annotations

import math
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from adacov.data import ImageData
from adacov.errors import NonFiniteLossError, TrainingInterrupted, UserError
from adacov.optim import MBF, mbf_param_groups
from adacov.training.checkpoint import load_checkpoint, save_checkpoint
from adacov.training.distributed import Replicas, start_replicas
from adacov.training.run_logger import RunLogger, environment
from adacov.training.stop_signals import StopSignals
from adacov.training.timing import StepTimer

DEVICES = ("auto", "cpu", "cuda")
NONFINITE_LOSS = ("stop", "skip")


@dataclass
class Position:
    """Where training stands; saved in every checkpoint so a run resumes at the exact batch.

    ``epoch`` counts finished epochs, ``batch`` the batches done in the current one; ``loss_sum`` and
    ``loss_count`` add up its finite losses for the epoch's mean train loss.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.optimizer``; return the last epoch's metrics.

    Writes into ``cfg.paths.output_dir``: ``metrics.csv``, ``epochs.csv``, ``config.yaml``,
    ``environment.json`` and ``checkpoint.pt`` (after each epoch, and when SIGTERM/SIGINT stops the
    run). With ``cfg.resume`` it continues from the checkpoint there, keeping exactly the logged rows
    up to it. Under ``torchrun`` each process trains a slice of every global batch (DDP); rank 0 logs
    and checkpoints.
    """
    check_settings(cfg)
    replicas, device_name = start_replicas(cfg.device, cfg.batch_size)
    try:
        return _train(cfg, replicas, resolve_device(device_name))
    finally:
        replicas.close()


def _train(cfg: DictConfig, replicas: Replicas, device: torch.device) -> dict[str, float]:
    run_dir = Path(cfg.paths.output_dir)
    data: ImageData = instantiate(cfg.data).to(device)
    if cfg.batch_size > data.train_x.shape[0]:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the {data.train_x.shape[0]} training images")
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights for every optimizer
    model: nn.Module = instantiate(
        cfg.model, in_channels=data.channels, image_size=data.image_size, num_classes=data.num_classes
    ).to(device)
    optimizer = build_optimizer(cfg.optimizer, model)

    checkpoint = load_checkpoint(run_dir, device) if cfg.resume else None
    position = Position()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        position = Position(**checkpoint["position"])
    net = replicas.wrap(model)

    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    logger = None
    if replicas.is_main:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run_info = {
            "run_name": run_dir.name,
            "optimizer": cfg.optimizer_name,
            "kernel_size": cfg.model.kernel_size,
            "seed": cfg.seed,
            "data": data.name,
            "batch_size": cfg.batch_size,
            "processes": replicas.world_size,
            "epochs": cfg.epochs,
            "steps_per_epoch": steps_per_epoch,
            "config": resolved,
            **environment(device),
        }
        logger = RunLogger(
            run_dir,
            OmegaConf.to_yaml(resolved),
            run_info,
            dict(cfg.wandb),
            resume_step=position.step if checkpoint is not None else None,
            resume_epoch=position.epoch if checkpoint is not None else None,
        )

    def save(position: Position) -> None:
        if replicas.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "position": asdict(position)}
            save_checkpoint(run_dir, state)

    mean, std = data.normalizer()
    skip_nonfinite = cfg.nonfinite_loss == "skip"
    last: dict[str, float] = {}
    try:
        with StopSignals() as signals:
            for epoch in range(position.epoch, cfg.epochs):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)
                model.train()
                epoch_start = time.perf_counter()
                progress = tqdm(
                    total=steps_per_epoch,
                    initial=position.batch,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    unit="step",
                    leave=False,
                    disable=not replicas.is_main,
                )
                with progress as bar:  # closed before any error message, so that starts its own line
                    steps = StepBuffer(replicas, device, logger, bar, steps_per_epoch)
                    batches = data.train_batches(cfg.batch_size, generator, skip=position.batch, shard=replicas.shard())
                    for x, y in batches:
                        inputs = (x.float().div_(255) - mean) / std
                        steps.timer.start()
                        optimizer.zero_grad(set_to_none=True)
                        loss = nn.functional.cross_entropy(net(inputs), y)
                        if not skip_nonfinite or all_finite(loss, replicas):
                            loss.backward()
                            optimizer.step()
                        steps.timer.stop()
                        position.step += 1
                        position.batch += 1
                        steps.add(position.step, loss.detach())
                        if device.type != "cuda" or len(steps) >= cfg.log_every:
                            _flush(steps, position, signals, skip_nonfinite, save, run_dir)
                    _flush(steps, position, signals, skip_nonfinite, save, run_dir)
                epoch_time = time.perf_counter() - epoch_start
                test_loss, test_acc = evaluate(model, data, mean, std, replicas)
                last = {
                    "epoch": epoch + 1,
                    "step": position.step,
                    "train_loss": position.loss_sum / position.loss_count if position.loss_count else math.nan,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "epoch_time_s": epoch_time,
                    "peak_mem_mb": peak_memory_mb(device),
                    "optimizer_state_mb": optimizer_state_bytes(optimizer) / 2**20,
                }
                if position.loss_count < steps_per_epoch:
                    tqdm.write(f"warning: skipped {steps_per_epoch - position.loss_count} steps with a non-finite loss")
                if logger is not None:
                    logger.log_epoch(last)
                    tqdm.write(
                        f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f}, "
                        f"test loss {test_loss:.4f}, test acc {test_acc:.4f}, {epoch_time:.1f} s"
                    )
                replicas.check_in_sync([*model.parameters(), *optimizer_tensors(optimizer)])
                position = Position(step=position.step, epoch=epoch + 1)
                save(position)
    finally:
        if logger is not None:
            logger.close()
    return last


class StepBuffer:
    """Steps whose losses and times are still on the device, moved to the host together.

    On GPU that is one host sync per ``log_every`` steps; under DDP one all-reduce turns each rank's
    loss into the global batch's mean and tells every rank whether any of them received a signal.
    """

    def __init__(
        self, replicas: Replicas, device: torch.device, logger: RunLogger | None, bar: tqdm, steps_per_epoch: int
    ) -> None:
        self.replicas, self.device, self.logger, self.bar = replicas, device, logger, bar
        self.timer = StepTimer(device)
        self.steps_per_epoch = steps_per_epoch
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def reduce(self, stop_requested: bool) -> tuple[list[float], bool]:
        """The buffered steps' global-batch losses, and whether any rank asked to stop."""
        flag = torch.tensor([float(stop_requested)], device=self.device)
        values = self.replicas.sum(torch.cat([*(loss.float().reshape(1) for loss in self.losses), flag])).tolist()
        return [v / self.replicas.world_size for v in values[:-1]], values[-1] > 0

    def log(self, losses: list[float]) -> None:
        """Log the first ``len(losses)`` buffered steps and drop the whole buffer."""
        rows = [
            {"step": s, "epoch": round(s / self.steps_per_epoch, 6), "loss": loss, "step_time_s": t}
            for s, loss, t in zip(self.steps, losses, self.timer.collect())
        ]
        if self.logger is not None and rows:
            self.logger.log_steps(rows)
        self.bar.update(len(self.steps))
        if losses:
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.steps.clear()
        self.losses.clear()


def _flush(steps: StepBuffer, position: Position, signals: StopSignals, skip_nonfinite: bool, save, run_dir: Path) -> None:
    """Log the buffered steps; stop the run on a non-finite loss (unless skipped) or on a signal."""
    losses, stop = steps.reduce(signals.received is not None)
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None and not skip_nonfinite:
        step = steps.steps[bad]
        steps.log(losses[:bad])
        raise NonFiniteLossError(
            f"the training loss is {losses[bad]} at step {step}: the run stopped; the {step - 1} steps before it are "
            f"logged in {run_dir}; lower optimizer.lr, or set nonfinite_loss=skip to skip such steps"
        )
    finite = [loss for loss in losses if math.isfinite(loss)]
    position.loss_sum += sum(finite)
    position.loss_count += len(finite)
    steps.log(losses)
    if stop:
        save(position)
        signum = signals.received or signal.SIGTERM
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {position.step}: checkpoint and logs saved in {run_dir}; "
            "continue with resume=true",
            signum,
        )


def all_finite(loss: torch.Tensor, replicas: Replicas) -> bool:
    """Whether every rank's loss is finite (a host sync: only ``nonfinite_loss=skip`` asks for it)."""
    bad = replicas.sum((~torch.isfinite(loss)).float().reshape(1))
    return bad.item() == 0


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageData, mean: torch.Tensor, std: torch.Tensor, replicas: Replicas = Replicas(), batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test set; each rank evaluates a contiguous share of it."""
    model.eval()
    n = data.test_x.shape[0]
    share = slice(replicas.rank * n // replicas.world_size, (replicas.rank + 1) * n // replicas.world_size)
    totals = torch.zeros(2, device=data.test_x.device)  # summed loss, correct predictions
    for i in range(share.start, share.stop, batch_size):
        x, y = data.test_x[i : min(i + batch_size, share.stop)], data.test_y[i : min(i + batch_size, share.stop)]
        logits = model((x.float().div_(255) - mean) / std)
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
    loss_sum, correct = replicas.sum(totals).tolist()
    return loss_sum / n, correct / n


def build_optimizer(optimizer_cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Bind the partially instantiated optimizer to the model's parameters (MBF: its mini-block groups)."""
    factory = instantiate(optimizer_cfg)
    params = mbf_param_groups(model) if getattr(factory, "func", None) is MBF else model.parameters()
    try:
        return factory(params)
    except ValueError as error:
        raise UserError(f"optimizer: {error}") from error


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that turns a constructor's ValueError/UserError into a UserError."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise UserError(str(cause)) from None
        raise


def check_settings(cfg: DictConfig) -> None:
    """Reject top-level settings that no run can use, naming the value and what is allowed."""
    for key in ("epochs", "batch_size", "log_every"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r} is not allowed: use an integer >= 1")
    if cfg.nonfinite_loss not in NONFINITE_LOSS:
        raise UserError(f"nonfinite_loss={cfg.nonfinite_loss!r} is not allowed: use stop or skip")
    if cfg.device not in DEVICES:
        raise UserError(f"device={cfg.device!r} is not allowed: use one of {', '.join(DEVICES)}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"wandb.mode={cfg.wandb.mode!r} is not allowed: use offline, online or disabled")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda is not available on this machine: use device=cpu or device=auto")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated this epoch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (moments, covariances, bases), without scalars such as ``step``."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for v in optimizer_tensors(optimizer))


__all__ = ["train", "evaluate", "build_optimizer", "check_settings", "resolve_device"]
