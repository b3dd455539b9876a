"""The training loop every experiment runs through: ``train(cfg)`` for a composed Hydra config."""

from __future__ import annotations

import csv
import logging
import math
import resource
import signal
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from torch import nn
from tqdm import tqdm

from adacov.data import ImageData
from adacov.errors import DivergenceError, NonFiniteLossError, OptimizerFailedError, TrainingInterrupted, UserError
from adacov.optim import KFAC, MBF, kfac_param_groups, mbf_param_groups
from adacov.training.checkpoint import load_checkpoint, save_checkpoint
from adacov.training.data_order import DATA_ORDERS, epoch_generator, fixed_order
from adacov.training.distributed import Replicas, start_replicas
from adacov.training.lr_scaling import LR_SCALINGS, lr_factor, resolve_rule, scale_learning_rates
from adacov.training.run_logger import DIVERGED, EPOCHS, RunLogger, environment
from adacov.training.salr import SALR, SALR_LOG, SALRSettings
from adacov.training.sharpness import salr_sharpness
from adacov.training.step_buffer import StepBuffer
from adacov.training.stop_signals import StopSignals

log = logging.getLogger(__name__)  # under Hydra: the run's train.log

DEVICES = ("auto", "cpu", "cuda")
NONFINITE_LOSS = ("stop", "skip")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Optimizer-config keys the loop and the experiments read; never passed to the optimizer's constructor.
LOOP_KEYS = ("create_graph", "tuned", "tune")


@dataclass
class Position:
    """Where training stands; saved in every checkpoint so a run resumes at the exact batch.

    ``epoch`` counts finished epochs, ``batch`` the batches done in the current one; ``loss_sum`` and
    ``loss_count`` add up its finite losses for the epoch's mean train loss, and ``epoch_seconds`` the
    wall time the stopped processes before this one spent in it, so that a resumed epoch's time is whole.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    epoch_seconds: float = 0.0


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.optimizer``; return the last epoch's metrics.

    Writes into ``cfg.paths.output_dir``: ``metrics.csv``, ``epochs.csv``, ``config.yaml``,
    ``environment.json`` (with the lr used), ``checkpoint.pt`` (after each epoch, and when SIGTERM/SIGINT
    stops the run) and, with ``salr.enabled``, ``salr.csv``. With ``cfg.resume`` it continues from the
    checkpoint there, keeping exactly the logged rows up to it. Under ``torchrun`` each process trains a
    slice of every global batch (DDP); rank 0 logs and checkpoints. The methods around the optimizer
    (``data_order``, ``lr_scaling``, ``salr``) are in docs/loop-methods.md.
    """
    check_settings(cfg)
    run_dir = Path(cfg.paths.output_dir)
    if cfg.resume and (last := finished_record(run_dir, cfg.epochs)) is not None:
        log.info(f"resume=true: {run_dir} records all {cfg.epochs} epochs already; nothing to train")
        return last
    if cfg.resume and (run_dir / DIVERGED).is_file():
        raise DivergenceError(
            f"{(run_dir / DIVERGED).read_text().strip()} (recorded in {run_dir / DIVERGED}; resume=true leaves a diverged "
            "run as it is: delete that file to train it again)"
        )
    replicas, device_name = start_replicas(cfg.device, cfg.batch_size)
    try:
        if replicas.is_main:
            (run_dir / DIVERGED).unlink(missing_ok=True)
        return Trainer(cfg, replicas, resolve_device(device_name)).run()
    except DivergenceError as error:
        if replicas.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / DIVERGED).write_text(f"{error}\n")
        raise
    finally:
        replicas.close()


def finished_record(run_dir: Path, epochs: int) -> dict[str, float] | None:
    """The last row of ``run_dir``'s epochs.csv where it records ``epochs`` epochs or more, else None.

    ``resume=true`` leaves such a record as it is, with or without a checkpoint (committed runs keep none):
    its config.yaml and environment.json keep the command and commit that trained it. A record that stops
    short resumes from its checkpoint, or trains from the start where there is none.
    """
    if not (run_dir / EPOCHS).is_file():
        return None
    with open(run_dir / EPOCHS, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or None in rows[-1].values() or int(rows[-1]["epoch"]) < epochs:  # None: a torn last line
        return None
    return {key: int(value) if key in ("epoch", "step") else float(value) for key, value in rows[-1].items()}


class Trainer:
    """One run: the data, model and optimizer built from ``cfg``, trained epoch by epoch from ``position``."""

    def __init__(self, cfg: DictConfig, replicas: Replicas, device: torch.device) -> None:
        self.cfg, self.replicas, self.device = cfg, replicas, device
        self.run_dir = Path(cfg.paths.output_dir)
        self.dtype = DTYPES[cfg.dtype]
        self.data: ImageData = instantiate(cfg.data).to(device)
        if cfg.batch_size > self.data.train_x.shape[0]:
            raise UserError(f"batch_size={cfg.batch_size} is larger than the {self.data.train_x.shape[0]} training images")
        torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights for every optimizer
        np.random.seed(cfg.seed)  # NumPy's global stream: some optimizers draw from it (Kron's balancing)
        self.model: nn.Module = instantiate(
            cfg.model, in_channels=self.data.channels, image_size=self.data.image_size, num_classes=self.data.num_classes
        ).to(device=device, dtype=self.dtype)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.lr_rule = resolve_rule(cfg.lr_scaling, self.optimizer, cfg.optimizer_name)
        self.lr_factor = lr_factor(self.lr_rule, cfg.batch_size, cfg.lr_reference_batch)
        scale_learning_rates(self.optimizer, self.lr_factor)
        self.start_lrs = [lr_number(group["lr"]) for group in self.optimizer.param_groups]  # before a resume's SALR lr
        self.salr = SALR(self.optimizer, SALRSettings.from_config(cfg.salr)) if cfg.salr.enabled else None
        self.order = fixed_order(cfg.data_order, cfg.seed, self.data.train_x.shape[0], device)
        self.create_graph = bool(cfg.optimizer.get("create_graph", False))
        if self.create_graph and replicas.distributed:
            raise UserError(
                f"optimizer={cfg.optimizer_name} needs backward(create_graph=True), which DDP does not support: "
                "train it in one process"
            )
        checkpoint = load_checkpoint(self.run_dir, device) if cfg.resume else None
        self.position = Position()
        self.last: dict[str, float] = {}  # the last finished epoch's metrics
        if checkpoint is not None:
            if ("salr" in checkpoint) != (self.salr is not None):
                raise UserError(
                    f"salr.enabled={self.salr is not None} does not match the checkpoint in {self.run_dir}, written with "
                    f"salr.enabled={'salr' in checkpoint}: resume with that setting, or start over without resume"
                )
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.position = Position(**checkpoint["position"])
            self.last = checkpoint["last_epoch"]
            if self.salr is not None:
                self.salr.load_state_dict(checkpoint["salr"])
            set_rng_state(checkpoint["rng"], device)
        self.net = replicas.wrap(self.model)
        self.steps_per_epoch = self.data.steps_per_epoch(cfg.batch_size)
        self.skip_nonfinite = cfg.nonfinite_loss == "skip"
        self.mean, self.std = (t.to(self.dtype) for t in self.data.normalizer())
        self.logger = self._open_logger(resumed=checkpoint is not None) if replicas.is_main else None

    def run(self) -> dict[str, float]:
        """Train the remaining epochs (none for a finished run resumed); return the last one's metrics."""
        try:
            with StopSignals() as signals:
                for epoch in range(self.position.epoch, self.cfg.epochs):
                    self._epoch(epoch, signals)
        except DivergenceError as error:
            if self.logger is not None:
                self.logger.record_divergence(str(error))
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
        return self.last

    def _epoch(self, epoch: int, signals: StopSignals) -> None:
        cfg, device, position = self.cfg, self.device, self.position
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generator = epoch_generator(cfg.seed, epoch, device)
        self.model.train()
        self.epoch_start = time.perf_counter() - position.epoch_seconds
        progress = tqdm(
            total=self.steps_per_epoch,
            initial=position.batch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            leave=False,
            disable=not self.replicas.is_main,
        )
        with progress as bar:  # closed before any error message, so that starts its own line
            steps = StepBuffer(self.replicas, device, self.logger, bar, self.steps_per_epoch)
            shard = self.replicas.shard()
            batches = self.data.train_batches(cfg.batch_size, generator, skip=position.batch, shard=shard, order=self.order)
            for x, y in batches:
                inputs = (x.to(self.dtype).div_(255) - self.mean) / self.std
                steps.timer.start()
                if self.salr is not None and self.salr.due(position.step + 1):
                    self._observe_sharpness(position.step + 1, inputs, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(self.net(inputs), y)
                if not self.skip_nonfinite or all_finite(loss, self.replicas):
                    backward(loss, self.create_graph)
                    try:
                        self.optimizer.step()
                    except torch.linalg.LinAlgError as error:
                        self._flush(steps, signals)
                        raise OptimizerFailedError(
                            f"the optimizer's step failed at step {position.step + 1} ({error}): the run diverged; the "
                            f"{position.step} steps before it are logged in {self.run_dir}; lower optimizer.lr"
                        ) from error
                steps.timer.stop()
                position.step += 1
                position.batch += 1
                steps.add(position.step, loss.detach())
                if device.type != "cuda" or len(steps) >= cfg.log_every:
                    self._flush(steps, signals)
            self._flush(steps, signals)
        epoch_time = time.perf_counter() - self.epoch_start

        test_loss, test_acc = evaluate(self.model, self.data, self.mean, self.std, self.replicas)
        self.last = last = {
            "epoch": epoch + 1,
            "step": position.step,
            "train_loss": position.loss_sum / position.loss_count if position.loss_count else math.nan,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_time_s": epoch_time,
            "peak_mem_mb": peak_memory_mb(device),
            "optimizer_state_mb": optimizer_state_bytes(self.optimizer) / 2**20,
        }
        if self.logger is not None:
            self.logger.log_epoch(last)
            if position.loss_count < self.steps_per_epoch:
                tqdm.write(f"warning: skipped {self.steps_per_epoch - position.loss_count} steps with a non-finite loss")
            summary = (f"epoch {epoch + 1}/{cfg.epochs}: train loss {last['train_loss']:.4f}, "
                       f"test loss {test_loss:.4f}, test acc {test_acc:.4f}, {epoch_time:.1f} s")  # fmt: skip
            tqdm.write(summary)
            log.info(summary)
        self.replicas.check_in_sync([*self.model.parameters(), *optimizer_tensors(self.optimizer)])
        self.position = Position(step=position.step, epoch=epoch + 1)
        self._save()

    def _observe_sharpness(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """SALR's probes on the step's batch, before its forward: they write nothing the step then reads."""
        s = self.salr.settings
        sharpness = salr_sharpness(
            self.model, inputs, targets, s.steps_descent, s.steps_ascent, s.step_size, s.direction, s.clamp, self.replicas.mean
        )
        self.salr.observe(step, sharpness)

    def _flush(self, steps: StepBuffer, signals: StopSignals) -> None:
        """Log the buffered steps; stop the run on a non-finite loss (unless skipped) or on a signal."""
        position = self.position
        losses, stop = steps.reduce(signals.received is not None)
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is not None and not self.skip_nonfinite:
            step = steps.steps[bad]
            steps.log(losses[:bad])
            raise NonFiniteLossError(
                f"the training loss is {losses[bad]} at step {step}: the run stopped; the {step - 1} steps before it "
                f"are logged in {self.run_dir}; lower optimizer.lr, or set nonfinite_loss=skip to skip such steps"
            )
        finite = [loss for loss in losses if math.isfinite(loss)]
        position.loss_sum += sum(finite)
        position.loss_count += len(finite)
        steps.log(losses)
        if stop:
            position.epoch_seconds = time.perf_counter() - self.epoch_start
            self._save()
            signum = signals.received or signal.SIGTERM
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} at step {position.step}: checkpoint and logs saved in {self.run_dir}; "
                "continue with resume=true",
                signum,
            )

    def _save(self) -> None:
        if self.replicas.is_main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "position": asdict(self.position),
                "last_epoch": self.last,
                "rng": get_rng_state(self.device),
            }
            if self.salr is not None:
                state["salr"] = self.salr.state_dict()
                self.salr.write_log(self.run_dir / SALR_LOG)
            save_checkpoint(self.run_dir, state)

    def _open_logger(self, resumed: bool) -> RunLogger:
        cfg = self.cfg
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run_info = {
            "run_name": self.run_dir.name,
            "optimizer": cfg.optimizer_name,
            "kernel_size": cfg.model.kernel_size,
            "seed": cfg.seed,
            "data": self.data.name,
            "batch_size": cfg.batch_size,
            "data_order": cfg.data_order,
            "lr_scaling": self.lr_rule,
            "lr_factor": self.lr_factor,
            "lr": self.start_lrs,  # each group's lr at the run's start
            "salr": self.salr is not None,
            "processes": self.replicas.world_size,
            "epochs": cfg.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "config": resolved,
            **environment(self.device),
        }
        return RunLogger(
            self.run_dir,
            OmegaConf.to_yaml(resolved),
            run_info,
            dict(cfg.wandb),
            resume_step=self.position.step if resumed else None,
            resume_epoch=self.position.epoch if resumed else None,
        )


def backward(loss: torch.Tensor, create_graph: bool) -> None:
    """``loss.backward``; with ``create_graph`` (Hessian-vector products) torch warns of a parameter-gradient
    reference cycle, which ``zero_grad(set_to_none=True)`` breaks at every step, so that warning is muted."""
    if not create_graph:
        loss.backward()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        loss.backward(create_graph=True)


def all_finite(loss: torch.Tensor, replicas: Replicas) -> bool:
    """Whether every rank's loss is finite (a host sync: only ``nonfinite_loss=skip`` asks for it)."""
    bad = replicas.sum((~torch.isfinite(loss)).float().reshape(1))
    return bad.item() == 0


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageData, mean: torch.Tensor, std: torch.Tensor, replicas: Replicas, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test set; each rank evaluates a contiguous share of it.

    Images are normalized in the dtype of ``mean`` (the run's parameter dtype)."""
    model.eval()
    n = data.test_x.shape[0]
    share = slice(replicas.rank * n // replicas.world_size, (replicas.rank + 1) * n // replicas.world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=data.test_x.device)  # summed loss, correct predictions
    for i in range(share.start, share.stop, batch_size):
        x, y = data.test_x[i : min(i + batch_size, share.stop)], data.test_y[i : min(i + batch_size, share.stop)]
        logits = model((x.to(mean.dtype).div_(255) - mean) / std)
        totals[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
    loss_sum, correct = replicas.sum(totals).tolist()
    return loss_sum / n, correct / n


def build_optimizer(optimizer_cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Bind the partially instantiated optimizer to the model's parameters, or to the param groups its
    class reads off the model (MBF's mini-blocks, the K-FAC family's layers); ``LOOP_KEYS`` are left out."""
    try:
        node = OmegaConf.to_container(optimizer_cfg, resolve=True)
    except InterpolationResolutionError as error:
        raise UserError(f"optimizer: {str(error).splitlines()[0]}; set optimizer.lr") from None
    for key in LOOP_KEYS:
        node.pop(key, None)
    factory = instantiate(OmegaConf.create(node))
    optimizer_class = getattr(factory, "func", None)
    group_builder = next((b for c, b in PARAM_GROUPS.items() if isinstance(optimizer_class, type) and issubclass(optimizer_class, c)), None)
    params = group_builder(model) if group_builder is not None else model.parameters()
    try:
        return factory(params)
    except ValueError as error:
        raise UserError(f"optimizer: {error}") from error


PARAM_GROUPS = {MBF: mbf_param_groups, KFAC: kfac_param_groups}


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """The global random streams a step may draw from: torch's (Hutchinson probes of AdaHessian and Sophia,
    Kron's preconditioner updates) and NumPy's (Kron's balancing). The data order has its own seeded
    generator per epoch."""
    state = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    np.random.set_state(state["numpy"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that turns a constructor's ValueError/UserError into a UserError."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ImportError):
            target = node.get("_target_", "?")
            raise UserError(
                f"{target} cannot be imported: install the optional baselines with pip install -e '.[baselines]' "
                "(make install does)"
            ) from None
        if isinstance(cause, (ValueError, TypeError)):
            raise UserError(str(cause)) from None
        raise


def check_settings(cfg: DictConfig) -> None:
    """Reject top-level settings that no run can use, naming the value and what is allowed."""
    for key in ("epochs", "batch_size", "log_every", "lr_reference_batch"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r} is not allowed: use an integer >= 1")
    if cfg.nonfinite_loss not in NONFINITE_LOSS:
        raise UserError(f"nonfinite_loss={cfg.nonfinite_loss!r} is not allowed: use stop or skip")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r} is not allowed: use one of {', '.join(DTYPES)}")
    if cfg.device not in DEVICES:
        raise UserError(f"device={cfg.device!r} is not allowed: use one of {', '.join(DEVICES)}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise UserError(f"wandb.mode={cfg.wandb.mode!r} is not allowed: use offline, online or disabled")
    if cfg.data_order not in DATA_ORDERS:
        raise UserError(f"data_order={cfg.data_order!r} is not allowed: use one of {', '.join(DATA_ORDERS)}")
    if cfg.lr_scaling not in LR_SCALINGS:
        raise UserError(f"lr_scaling={cfg.lr_scaling!r} is not allowed: use one of {', '.join(LR_SCALINGS)}")
    if not isinstance(cfg.salr.enabled, bool):
        raise UserError(f"salr.enabled={cfg.salr.enabled!r} is not allowed: use true or false")
    SALRSettings.from_config(cfg.salr)


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
    """The optimizer's state tensors (moments, covariances, bases), without scalars such as ``step``.

    Found also inside lists, dicts and helper objects (SOAP's per-dimension preconditioners are lists,
    Shampoo's live in ``PreConditioner`` objects); each tensor once.
    """
    found: list[torch.Tensor] = []
    pending = [v for state in optimizer.state.values() for v in state.values()]
    seen: set[int] = set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if torch.is_tensor(value):
            if value.dim() > 0 and not isinstance(value, nn.Parameter):
                found.append(value)
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            pending.extend(vars(value).values())
    return found


def lr_number(lr: float | torch.Tensor) -> float:
    """A param group's lr as a float (some optimizers accept a 1-element tensor)."""
    return float(lr.item()) if torch.is_tensor(lr) else float(lr)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for v in optimizer_tensors(optimizer))


__all__ = ["train", "evaluate", "build_optimizer", "check_settings", "resolve_device"]
