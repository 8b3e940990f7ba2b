"""Write a stand-in "pretrained" checkpoint, since nothing can be downloaded here.

It builds a model from a factory with random weights, gives every BatchNorm non-trivial
running statistics, and saves it the way a training job would, optionally wrapped:

    python examples/make_checkpoint.py torchvision.models:resnet50 checkpoints/resnet50.pth
    python examples/make_checkpoint.py torchvision.models:resnet18 ckpt.pth --wrap ddp
    python examples/make_checkpoint.py torchvision.models:resnet18 ckpt.ckpt --wrap lightning

With a real checkpoint (e.g. torchvision's ImageNet weights) you skip this step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from remap.sources.factories import build


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and non-trivial BatchNorm statistics, so that a wrong load shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.05)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(1000)
    return model


def wrap(state: dict[str, torch.Tensor], how: str) -> object:
    if how == "ddp":
        return {f"module.{k}": v for k, v in state.items()}
    if how == "compile":
        return {f"_orig_mod.{k}": v for k, v in state.items()}
    if how == "ddp+compile":
        return {f"module._orig_mod.{k}": v for k, v in state.items()}
    if how == "lightning":
        return {
            "epoch": 3,
            "global_step": 1200,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "hyper_parameters": {"lr": 0.1, "num_classes": 1000},
        }
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", help='model factory, "module.path:callable"')
    p.add_argument("out", type=Path, help="checkpoint to write (.pth/.pt/.ckpt via torch.save, .safetensors)")
    p.add_argument("--wrap", choices=["none", "ddp", "compile", "ddp+compile", "lightning"], default="none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = perturb(build(args.factory), args.seed)
    obj = wrap(model.state_dict(), args.wrap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(args.out))  # type: ignore[union-attr]
    else:
        torch.save(obj, args.out)
    print(f"wrote {args.out} ({args.factory}, random weights, wrap={args.wrap})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
