"""Freezing after a load: requires_grad off, and BatchNorm kept in eval or made frozen.

The planner decides *which* parameters and BatchNorm modules are frozen (from names
alone); this module does it to a real module.

``batchnorm: eval`` locks a BatchNorm module in eval mode, so ``model.train()`` no longer
turns its running statistics back on. ``batchnorm: frozen`` replaces BatchNorm2d with
torchvision's FrozenBatchNorm2d, whose statistics and affine terms are constant buffers.

>>> import torch
>>> bn = torch.nn.BatchNorm2d(3)
>>> lock_eval(bn)
>>> _ = bn.train()
>>> bn.training
False
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["batchnorm_modules", "lock_eval", "apply_freeze", "plain_state_dict"]

COUNTER = "remap_num_batches_tracked"  # a frozen copy's attribute: the replaced BatchNorm's counter, as loaded


def batchnorm_modules(module: nn.Module) -> dict[str, str]:
    """Names and class names of the BatchNorm modules (``_BatchNorm`` subclasses) in ``module``."""
    return {
        name: type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


class _EvalLock:
    """Replaces a module's ``train`` so that it always puts the module in eval mode.

    A plain class (not a lambda) so that the module still pickles and deep-copies.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def lock_eval(module: nn.Module) -> None:
    """Put ``module`` in eval mode for good: ``train()`` on it or its parents keeps it there."""
    nn.Module.train(module, False)
    module.train = _EvalLock(module)  # type: ignore[method-assign]


def _frozen_copy(bn: nn.Module) -> nn.Module:
    from ..sources.factories import ensure_torchvision

    ensure_torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        if bn.weight is not None:
            frozen.weight.copy_(bn.weight.detach())
            frozen.bias.copy_(bn.bias.detach())
        if bn.running_mean is not None:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
    like = bn.running_mean if bn.running_mean is not None else bn.weight
    frozen = frozen.to(device=like.device, dtype=like.dtype) if like is not None else frozen
    if bn.num_batches_tracked is not None:  # FrozenBatchNorm2d has no counter; a save writes this one back
        setattr(frozen, COUNTER, bn.num_batches_tracked.detach().clone())
    return frozen


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with the keys of the plain architecture: every FrozenBatchNorm2d
    that ``batchnorm: frozen`` put in place of a BatchNorm2d gets that BatchNorm's
    ``num_batches_tracked`` back, as it was loaded, after its ``running_var``.

    A file saved from it loads into the un-frozen model (strictly) and into a frozen one
    (FrozenBatchNorm2d ignores the counter when loading).
    """
    counters = {}
    for name, m in module.named_modules():
        counter = getattr(m, COUNTER, None)
        if isinstance(counter, torch.Tensor):
            prefix = f"{name}." if name else ""
            counters[f"{prefix}running_var"] = (f"{prefix}num_batches_tracked", counter)
    state = module.state_dict()
    if not counters:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[key] = value
        if key in counters:
            name, counter = counters[key]
            out[name] = counter
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)


def apply_freeze(module: nn.Module, frozen: Iterable[str], batchnorm: str, bn_names: Iterable[str]) -> None:
    """Turn off requires_grad on the ``frozen`` parameter names, then apply the BatchNorm mode."""
    params = dict(module.named_parameters(remove_duplicate=False))
    for key in frozen:
        params[key].requires_grad_(False)
    for name in bn_names:
        bn = module.get_submodule(name)
        if batchnorm == "eval":
            lock_eval(bn)
        elif batchnorm == "frozen":
            _replace(module, name, _frozen_copy(bn))
