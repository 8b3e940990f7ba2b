"""``include: [weight-norm]``: a checkpoint of a model weight-normalised with the deprecated
``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``) into the same model normalised with
``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original0/1``), and
back; the outputs of the two models agree both ways."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrizations

import remap
from remap.errors import CheckError
from weights import perturb

RULES = {"version": 1, "include": ["weight-norm"]}
FRAGMENT = Path(__file__).resolve().parents[1] / "src" / "remap" / "rules" / "fragments" / "weight-norm.yaml"


def old_weight_norm(module: nn.Module, dim: int | None = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated: the point of the test
        return torch.nn.utils.weight_norm(module, dim=dim)


class Vocoder(nn.Module):
    """A HiFi-GAN-like stack: weight-normalised convolutions (one normalised over dim 2, as
    wav2vec2's positional convolution is) and a plain output layer."""

    def __init__(self, new: bool) -> None:
        super().__init__()
        norm = (lambda m, dim=0: parametrizations.weight_norm(m, dim=dim)) if new else old_weight_norm
        self.pre = norm(nn.Conv1d(4, 8, 7, padding=3))
        self.ups = nn.ModuleList([norm(nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1)), norm(nn.Conv1d(6, 6, 3, padding=1), dim=2)])
        self.post = nn.Conv1d(6, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for layer in self.ups:
            x = torch.tanh(layer(x))
        return self.post(x)




def weight_normed_linear(new: bool) -> nn.Module:
    """A bare weight-normalised layer: its keys have no module prefix (``weight_g``)."""
    layer = nn.Linear(5, 3)
    return parametrizations.weight_norm(layer) if new else old_weight_norm(layer)


def test_the_two_conventions_name_the_tensors_as_the_fragment_says() -> None:
    """The names come from torch itself, not from the fragment."""
    old, new = Vocoder(new=False).state_dict(), Vocoder(new=True).state_dict()
    assert {"pre.weight_g", "pre.weight_v", "ups.1.weight_g"} <= set(old)
    assert {"pre.parametrizations.weight.original0", "pre.parametrizations.weight.original1"} <= set(new)
    assert [tuple(v.shape) for v in old.values()] == [tuple(v.shape) for v in new.values()]


@pytest.mark.parametrize("direction", ["old->new", "new->old"])
def test_checkpoint_of_one_convention_loads_into_the_other_with_equal_outputs(tmp_path: Path, direction: str) -> None:
    source_is_new = direction == "new->old"
    source = perturb(Vocoder(new=source_is_new), seed=3)
    path = tmp_path / "vocoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = Vocoder(new=not source_is_new)
    report = remap.load(target, path, rules=RULES)
    assert report.ok and report.totals.loaded == report.totals.target_keys == 11
    g = "pre.weight_g" if source_is_new else "pre.parametrizations.weight.original0"
    assert report.target_record(g).sources == ("pre.parametrizations.weight.original0" if source_is_new else "pre.weight_g",)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_round_trip_old_new_old_keeps_every_tensor(tmp_path: Path) -> None:
    old = perturb(Vocoder(new=False), seed=4)
    new = Vocoder(new=True)
    remap.load(new, {k: v.clone() for k, v in old.state_dict().items()}, rules=RULES)
    back = Vocoder(new=False)
    remap.load(back, {k: v.clone() for k, v in new.state_dict().items()}, rules=RULES)
    for key, value in old.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("source_is_new", [False, True])
def test_keys_without_a_module_prefix(source_is_new: bool) -> None:
    source = perturb(weight_normed_linear(source_is_new), seed=5)
    target = weight_normed_linear(not source_is_new)
    assert remap.load(target, {k: v.clone() for k, v in source.state_dict().items()}, rules=RULES).ok
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_same_convention_on_both_sides_fails_loudly() -> None:
    source = Vocoder(new=True).state_dict()
    with pytest.raises(CheckError) as info:
        remap.load(Vocoder(new=True), dict(source), rules=RULES)
    kinds = {f.kind for f in info.value.report.failures}
    assert {"missing", "unused"} <= kinds


def test_every_line_of_the_fragment_says_why() -> None:
    code = [line for line in FRAGMENT.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code and all(" # " in line for line in code), [line for line in code if " # " not in line]
