"""The OmegaConf resolver the configs use, registered before Hydra composes a config."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def item(container: DictConfig | ListConfig, key: Any) -> Any:
    """``${item:${a.list},${i}}`` is ``a.list[i]``; ``${item:${a.map},${k}}`` is ``a.map[k]``, integer keys included.

    Hand-written because OmegaConf's nested interpolation must produce a string key
    (``${a.list.${i}}`` fails for an integer ``i``), and the experiments pick by a trial index
    (``experiment=tune``) and by ``model.kernel_size`` (the tuned learning rates).
    """
    if isinstance(container, ListConfig):
        if not 0 <= int(key) < len(container):
            raise KeyError(f"index {key} is outside the {len(container)} values {list(container)}")
        return container[int(key)]
    if key not in container:
        raise KeyError(f"{key} is not among {', '.join(str(k) for k in container)}")
    return container[key]


def register_resolvers() -> None:
    """Register :func:`item` once per process."""
    if not OmegaConf.has_resolver("item"):
        OmegaConf.register_new_resolver("item", item)
