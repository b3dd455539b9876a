"""The training loop every experiment runs through: ``train(cfg)`` for a composed Hydra config."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from adacov.data import ImageData
from adacov.errors import UserError
from adacov.optim import MBF, mbf_param_groups
from adacov.training.checkpoint import load_checkpoint, save_checkpoint
from adacov.training.run_logger import RunLogger, environment
from adacov.training.timing import StepTimer

DEVICES = ("auto", "cpu", "cuda")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.optimizer``; return the last epoch's metrics.

    Writes into ``cfg.paths.output_dir``: ``metrics.csv``, ``epochs.csv``, ``config.yaml``,
    ``environment.json`` and ``checkpoint.pt`` (after each epoch). With ``cfg.resume`` it continues
    from the checkpoint there, keeping exactly the logged rows up to it.
    """
    check_settings(cfg)
    device = resolve_device(cfg.device)
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
    step, start_epoch = 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, start_epoch = checkpoint["step"], checkpoint["epoch"]

    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_info = {
        "run_name": run_dir.name,
        "optimizer": cfg.optimizer_name,
        "kernel_size": cfg.model.kernel_size,
        "seed": cfg.seed,
        "data": data.name,
        "batch_size": cfg.batch_size,
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
        resume_step=step if checkpoint is not None else None,
        resume_epoch=start_epoch if checkpoint is not None else None,
    )
    mean, std = data.normalizer()
    timer = StepTimer(device)
    last: dict[str, float] = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch)
            model.train()
            losses: list[torch.Tensor] = []
            rows: list[dict[str, Any]] = []
            loss_sum = 0.0
            epoch_start = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
            for x, y in data.train_batches(cfg.batch_size, generator):
                inputs = (x.float().div_(255) - mean) / std
                timer.start()
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(inputs), y)
                loss.backward()
                optimizer.step()
                timer.stop()
                step += 1
                losses.append(loss.detach())
                rows.append({"step": step, "epoch": round(step / steps_per_epoch, 6)})
                if device.type != "cuda" or len(rows) >= cfg.log_every:
                    loss_sum += _flush(rows, losses, timer, logger, bar)
            loss_sum += _flush(rows, losses, timer, logger, bar)
            bar.close()
            epoch_time = time.perf_counter() - epoch_start
            test_loss, test_acc = evaluate(model, data, mean, std)
            last = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": loss_sum / steps_per_epoch,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "epoch_time_s": epoch_time,
                "peak_mem_mb": peak_memory_mb(device),
                "optimizer_state_mb": optimizer_state_bytes(optimizer) / 2**20,
            }
            logger.log_epoch(last)
            save_checkpoint(
                run_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch + 1}
            )
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f}, test loss {test_loss:.4f}, "
                f"test acc {test_acc:.4f}, {epoch_time:.1f} s"
            )
    finally:
        logger.close()
    return last


def _flush(rows: list[dict[str, Any]], losses: list[torch.Tensor], timer: StepTimer, logger: RunLogger, bar: tqdm) -> float:
    """Move the buffered steps' losses and times to the host (one sync on GPU), log them, return their sum."""
    if not rows:
        return 0.0
    values = torch.stack(losses).tolist()
    for row, loss, seconds in zip(rows, values, timer.collect()):
        row["loss"], row["step_time_s"] = loss, seconds
    logger.log_steps(rows)
    bar.update(len(rows))
    bar.set_postfix(loss=f"{values[-1]:.4f}")
    rows.clear()
    losses.clear()
    return sum(values)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, mean: torch.Tensor, std: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test set."""
    model.eval()
    total_loss = torch.zeros((), device=data.test_x.device)
    correct = torch.zeros((), device=data.test_x.device)
    for x, y in data.test_batches(batch_size):
        logits = model((x.float().div_(255) - mean) / std)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = data.test_x.shape[0]
    return total_loss.item() / n, correct.item() / n


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
    if cfg.device not in DEVICES:
        raise UserError(f"device={cfg.device!r} is not allowed: use one of {', '.join(DEVICES)}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"wandb.mode={cfg.wandb.mode!r} is not allowed: use offline, online or disabled")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda is not available on this machine: use device=cpu or device=auto")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated this epoch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


__all__ = ["train", "evaluate", "build_optimizer", "check_settings", "resolve_device"]
