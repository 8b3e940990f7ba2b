"""Small source and target modules for the conversion configs (tests/test_conversions.py).

Every callable here without required arguments works as a ``--target`` factory spec
(``conversion_models:GPT``): tests/ is on ``sys.path`` while pytest runs.

- :class:`GPT` — a nanoGPT-style GPT-2 with ``nn.Linear`` where Hugging Face's
  ``GPT2LMHeadModel`` has ``Conv1D``, under the same key names, computing the same thing.
- :class:`QKVAttention` — attention with separate ``q_proj``/``k_proj``/``v_proj`` and an
  ``out_proj``, computing exactly what ``nn.MultiheadAttention`` computes.
- :class:`AttentionStack` — attention layers under ``layers.N.attn``, so the merge/split
  patterns are checked on nested keys too.
- ViT and ResNet factories at the small sizes the default tests use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- GPT-2 with nn.Linear


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v side by side, as HF's Conv1D
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scaled by 1/sqrt(head_dim)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # HF's "gelu_new"


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 (pre-LayerNorm, learned positions, tied output embedding), nanoGPT style.

    The defaults are the small test size; ``GPT.gpt2()`` is the 124M model.
    """

    def __init__(self, vocab_size: int = 100, n_positions: int = 32, n_embd: int = 64, n_layer: int = 2,
                 n_head: int = 2, layer_norm_epsilon: float = 1e-5) -> None:  # fmt: skip
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(n_positions, n_embd),
                "h": nn.ModuleList(Block(n_embd, n_head, layer_norm_epsilon) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(n_embd, eps=layer_norm_epsilon),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

    @classmethod
    def gpt2(cls) -> GPT:
        return cls(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# --------------------------------------------------------------------------- separate q/k/v vs nn.MultiheadAttention

EMBED_DIM, NUM_HEADS = 32, 4


class QKVAttention(nn.Module):
    """Multi-head attention with separate projections; ``forward`` has MHA's batch-first
    signature and returns ``(output, None)`` like ``MultiheadAttention(need_weights=False)``."""

    def __init__(self, embed_dim: int = EMBED_DIM, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, None]:
        b, lq, e = query.shape
        h, d = self.num_heads, e // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], h, d).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, lq, e)), None


def mha(embed_dim: int = EMBED_DIM, num_heads: int = NUM_HEADS) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)


class AttentionStack(nn.Module):
    """Pre-norm self-attention layers under ``layers.N.attn``: separate q/k/v projections,
    or ``nn.MultiheadAttention`` with ``mha=True``."""

    def __init__(self, depth: int = 2, embed_dim: int = EMBED_DIM, num_heads: int = NUM_HEADS, mha: bool = False) -> None:
        super().__init__()
        make = (lambda: nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)) if mha else (lambda: QKVAttention(embed_dim, num_heads))
        self.layers = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(embed_dim), "attn": make()}) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = layer["norm"](x)
            x = x + layer["attn"](y, y, y, need_weights=False)[0]
        return x


def qkv_stack() -> AttentionStack:
    return AttentionStack()


def mha_stack() -> AttentionStack:
    return AttentionStack(mha=True)


# --------------------------------------------------------------------------- ViT

VIT_SMALL = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


def timm_vit(img_size: int = 32) -> nn.Module:
    """A small timm ViT (the vit_base_patch16_224 architecture, scaled down)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, **VIT_SMALL)


def timm_vit_64(img_size: int = 64) -> nn.Module:
    """The small timm ViT at twice the resolution: 8x8 patches instead of 4x4.

    ``--target`` keeps the config's kwargs, whose ``img_size: 384`` is for the full-size
    model; the small stand-in takes the argument and keeps its own size.
    """
    return timm_vit(64)


def torchvision_vit() -> nn.Module:
    """torchvision's VisionTransformer matching :func:`timm_vit` (vit_b_16's structure)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=VIT_SMALL["patch_size"], num_layers=VIT_SMALL["depth"],
                             num_heads=VIT_SMALL["num_heads"], hidden_dim=VIT_SMALL["embed_dim"],
                             mlp_dim=4 * VIT_SMALL["embed_dim"], num_classes=VIT_SMALL["num_classes"])  # fmt: skip


# --------------------------------------------------------------------------- ResNet


def resnet18_in_channels(in_chans: int) -> nn.Module:
    """torchvision's resnet18 with a stem for ``in_chans`` input channels, as a user writes it."""
    import torchvision

    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18_gray() -> nn.Module:
    return resnet18_in_channels(1)


def resnet18_rgbn() -> nn.Module:
    """RGB + near-infrared: 4 input channels."""
    return resnet18_in_channels(4)


HEAD_SUBSET_CLASSES = 5  # the length of the example index list in configs/imagenet-head-subset.yaml


def resnet18_head_subset(num_classes: int = HEAD_SUBSET_CLASSES) -> nn.Module:
    """A ResNet-18 with the config's subset head (``--target`` passes the config's ``num_classes``)."""
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)
