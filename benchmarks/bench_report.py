"""What every benchmark report carries: the machine it ran on, and the command that made it."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def machine_description(device: torch.device) -> str:
    """The device, torch and Python; on a CPU also the cores, the threads, and the 1-minute load average when
    the report is written, flagged when it exceeds the threads this process used (others shared the cores)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    model = _cpu_model()
    cpu = f"{platform.processor() or platform.machine()}{f' ({model})' if model else ''}"
    busy = " - UNDER LOAD: other processes shared the cores, so every time here is slower than on an idle machine"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores, {threads} torch thread{'' if threads == 1 else 's'}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; 1-minute load average {load:.1f} when "
        f"written{busy if load > threads + 0.5 else ''}"
    )


def _cpu_model() -> str:
    """The CPU's model as Linux reports it (empty elsewhere): name, family and model number, since a VM often names
    only the vendor, and hosts of one VM size differ in their timings."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first = cpuinfo.read().split("\n\n")[0]
    except OSError:
        return ""
    pairs = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in pairs}
    if "model name" not in fields:
        return ""
    return f"{fields['model name']}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def publish(text: str, out: Path | None, title: str, script: str, argv: list[str] | None) -> None:
    """Print the report; with ``out``, also write it as markdown under ``title`` with the command that made it."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
        out.write_text(f"# {title}\n\nCommand: `{command}`\n\n{text}\n")
