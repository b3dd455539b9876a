"""Optimizer step time per rank with 1 and with N gloo ranks: how much of AdaCov's overhead sharing removes.

Each rank holds the same model and, at each step, the same gradient (DDP's averaged gradient is the same on every
rank; a new batch's at each step, so that the covariances have full rank as in training) and times
``optimizer.step()`` alone for Adam and each optimizer asked for, interleaved, with a barrier before every
timed step so that no rank waits inside a collective for a late one. Every run gives each rank the same number
of torch threads (the CPU's cores over the largest number of ranks), so a rank's compute is the same whether
it runs alone or beside others; the overhead per rank is the median step minus Adam's median step, on the slowest
rank.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import ConvNet6


def _rank(rank: int, ranks: int, init: str, build: Callable, settings: dict, queue) -> None:
    try:
        torch.set_num_threads(settings["threads"])
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
        torch.manual_seed(0)
        model = ConvNet6(settings["kernel_size"], settings["widths"], in_channels=settings["in_channels"],
                         num_classes=settings["classes"])  # fmt: skip
        grads = []
        for _ in range(settings["warmup"] + settings["rounds"]):
            x = torch.randn(settings["batch"], settings["in_channels"], 32, 32)
            y = torch.randint(0, settings["classes"], (settings["batch"],))
            model.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        optimizers = {name: build(name, model) for name in settings["names"]}
        samples: dict[str, list[float]] = {name: [] for name in optimizers}
        for r in range(settings["warmup"] + settings["rounds"]):
            for name, optimizer in optimizers.items():
                for p, g in zip(model.parameters(), grads[r]):
                    p.grad.copy_(g)
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                if r >= settings["warmup"]:
                    samples[name].append(time.perf_counter() - start)
        queue.put((rank, {name: statistics.median(s) for name, s in samples.items()}))
        dist.destroy_process_group()
    except Exception:  # the parent stops every rank instead of waiting for the one that failed
        queue.put((rank, traceback.format_exc()))


def step_times(ranks: int, build: Callable, settings: dict) -> list[dict[str, float]]:
    """Each rank's median ``optimizer.step()`` seconds per optimizer name (``settings["names"]``, Adam first)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        processes = [context.Process(target=_rank, args=(r, ranks, os.path.join(directory, "init"), build, settings, queue))
                     for r in range(ranks)]  # fmt: skip
        for process in processes:
            process.start()
        found: dict[int, dict[str, float]] = {}
        try:
            while len(found) < ranks:
                rank, result = queue.get(timeout=1800)
                if isinstance(result, str):
                    raise RuntimeError(f"rank {rank} failed:\n{result}")
                found[rank] = result
        finally:
            for process in processes:
                process.join(timeout=60 if len(found) == ranks else 0)
                if process.is_alive():
                    process.terminate()
    return [found[r] for r in range(ranks)]


def overheads(times: list[dict[str, float]], names: list[str]) -> dict[str, tuple[float, float]]:
    """Per optimizer, the slowest rank's median step and its overhead over Adam's median step on that rank."""
    slowest = {name: max(times, key=lambda t: t[name] - t["adam"]) for name in names}
    return {name: (slowest[name][name], slowest[name][name] - slowest[name]["adam"]) for name in names}
