"""Small models with non-trivial weights, and ways to compare module states."""

from __future__ import annotations

import copy
import torch
from torch import nn


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so that a wrong load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(1000 + seed)
    return model


class Small(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc: a backbone and a head in 9 keys."""

    def __init__(self, num_classes: int = 5, in_ch: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class Tied(nn.Module):
    """An embedding and an output projection sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight


def snapshot(module: nn.Module) -> dict:
    """Everything a load may change: tensors (bytes), requires_grad flags, training modes, structure."""
    return {
        "tensors": {k: _raw(v) for k, v in module.state_dict(keep_vars=True).items()},
        "grads": {k: p.requires_grad for k, p in module.named_parameters()},
        "modes": {k: m.training for k, m in module.named_modules()},
        "types": {k: type(m).__name__ for k, m in module.named_modules()},
    }


def _raw(t: torch.Tensor) -> tuple:
    flat = t.detach().contiguous().reshape(-1)
    return (str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes(), t.requires_grad)


def fresh_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
