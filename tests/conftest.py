"""Test-wide set-up: offline hubs, torchvision importable, small seeded models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from remap.sources.factories import ensure_torchvision  # noqa: E402

ensure_torchvision()  # timm and transformers import torchvision: the shim must come first
