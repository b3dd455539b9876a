"""What the param-group builders (``mbf_param_groups``, ``kfac_param_groups``) share."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["with_names"]


def with_names(groups: list[dict[str, Any]], model: nn.Module) -> list[dict[str, Any]]:
    """The same groups with each tensor as ``(name, tensor)``, named as ``model.named_parameters()`` names it,
    as torch.optim takes named parameters (their names are saved in ``state_dict()["param_groups"]``)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [{**group, "params": [(names[id(p)], p) for p in group["params"]]} for group in groups]
