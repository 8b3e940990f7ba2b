"""Optimizer state exported back (issue 15, item 4's last sentence): ``remap.export(..., optimizer=opt)``.

The reference is torch itself: the unrefactored model with a plain AdamW, resumed by
``load_state_dict`` from what remap exported, trained on the same batches as the
refactored run; and the original optimizer's own ``state_dict`` for the round trip.
The refactored weights are mapped back by hand (``chunk`` and a rename), not by remap.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import remap
from remap.errors import UsageError

from loading.test_optimizer_state import DIM, New, Old, _attend  # the same refactor as the load tests

HERE = __name__  # Old is a name of this module too: "<this module>:Old" finds it


class NewT(New):
    """The refactor with the head stored transposed (``head_t``: [DIM, 3])."""

    def __init__(self) -> None:
        super().__init__()
        del self.head
        self.head_t = nn.Parameter(torch.zeros(DIM, 3))
        self.head_b = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(x)).chunk(3, dim=-1)
        return _attend(q, k, v) @ self.head_t + self.head_b


FUSE = [{"merge": {"match": r"^(q|k|v)\.(weight|bias)$", "group": 1, "into": r"qkv.\2", "order": ["q", "k", "v"]}}]
REFACTOR = {"version": 1, "rules": [*FUSE, {"rename": {r"^fc\.": "head."}}]}
BATCHES = [(torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(i)), torch.randn(5, 3, generator=torch.Generator().manual_seed(100 + i)))
           for i in range(7)]  # fmt: skip


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def trained_old() -> tuple[Old, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Old()
    opt = adamw(model.parameters())
    train(model, opt, BATCHES[:3])
    return model, opt


def resumed_new(old: Old, opt: torch.optim.Optimizer, rules: Any = REFACTOR, cls: type[New] = New) -> tuple[New, torch.optim.Optimizer]:
    torch.manual_seed(1)
    new = cls()
    new_opt = adamw(new.parameters())
    named = {**rules, "source": {"model": f"{HERE}:Old"}}  # the saved state has no param_names: source.model names it
    report = remap.load(new, old.state_dict(), rules=named, optimizer=new_opt, optimizer_state=opt.state_dict())
    assert report.ok
    return new, new_opt


def mapped_back(new: New) -> dict[str, torch.Tensor]:
    """The refactored weights in the original's names, by hand."""
    sd = new.state_dict()
    out = {"embed.weight": sd["embed.weight"], "embed.bias": sd["embed.bias"], "fc.weight": sd["head.weight"], "fc.bias": sd["head.bias"]}
    for part, w, b in zip("qkv", sd["qkv.weight"].chunk(3), sd["qkv.bias"].chunk(3)):
        out[f"{part}.weight"], out[f"{part}.bias"] = w, b
    return out


def same(a: Any, b: Any) -> bool:
    """Equal structure and bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def without_names(sd: dict[str, Any]) -> dict[str, Any]:
    return {"state": sd["state"], "param_groups": [{k: v for k, v in g.items() if k != "param_names"} for g in sd["param_groups"]]}


@pytest.mark.parametrize("order", ["like", "source.model"])
def test_refactor_round_trip_resumes_the_original_run(tmp_path: Path, order: str) -> None:
    old, opt = trained_old()
    like = copy.deepcopy(old.state_dict())
    rules = REFACTOR if order == "like" else {**REFACTOR, "source": {"model": f"{HERE}:Old"}}
    new, new_opt = resumed_new(old, opt, rules)
    train(new, new_opt, BATCHES[3:5])

    out = remap.export(new, rules, like=like, save=tmp_path / "back.safetensors", optimizer=new_opt,
                       optimizer_save=tmp_path / "optimizer.pt")  # fmt: skip
    assert out.ok and out.optimizer is not None and out.optimizer.names == order
    assert {t.key: t.status for t in out.optimizer.targets} == dict.fromkeys(
        ["embed.weight", "embed.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "fc.weight", "fc.bias"], "loaded")
    assert out.optimizer_state_dict["param_groups"][0]["param_names"] == [n for n, _ in Old().named_parameters()]

    back = Old()
    back.load_state_dict(load_file(tmp_path / "back.safetensors"))
    back_opt = adamw(back.parameters())
    back_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train(back, back_opt, BATCHES[5:7])
    train(new, new_opt, BATCHES[5:7])
    ref = mapped_back(new)
    got = back.state_dict()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-5

    # the check can fail: the same resume with a fresh optimizer ends elsewhere
    fresh = Old()
    fresh.load_state_dict(out.state_dict)
    train(fresh, adamw(fresh.parameters()), BATCHES[5:7])
    assert max(float((fresh.state_dict()[k] - ref[k]).abs().max()) for k in ref) > 1e-3


def test_no_training_gives_the_original_optimizer_state_bit_for_bit() -> None:
    old, opt = trained_old()
    original = copy.deepcopy(opt.state_dict())
    new, new_opt = resumed_new(old, opt)
    out = remap.export(new, REFACTOR, like=copy.deepcopy(old.state_dict()), optimizer=new_opt)
    assert out.ok and out.optimizer_state_dict is not None
    assert same(without_names(out.optimizer_state_dict), original)
    # and a plain AdamW takes it
    fresh = Old()
    fresh_opt = adamw(fresh.parameters())
    fresh_opt.load_state_dict(out.optimizer_state_dict)
    assert same(without_names(fresh_opt.state_dict()), original)


def test_transpose_goes_back_and_the_text_and_json_report_it() -> None:
    old, opt = trained_old()
    rules = {"version": 1, "rules": [*FUSE, {"rename": {r"^fc\.weight$": "head_t", r"^fc\.bias$": "head_b"}},
                                     {"transpose": {"match": "^head_t$", "dims": [1, 0]}}]}  # fmt: skip
    original = copy.deepcopy(opt.state_dict())
    new, new_opt = resumed_new(old, opt, rules, NewT)
    out = remap.export(new, rules, like=copy.deepcopy(old.state_dict()), optimizer=new_opt)
    assert same(without_names(out.optimizer_state_dict), original)
    assert "optimizer" in str(out) and out.to_dict()["optimizer"]["totals"]["loaded"] == 10


def test_state_a_lossy_op_led_to_is_dropped_and_reported() -> None:
    """A pad leaves nothing for the pad's entries to go back to: the state is dropped, never made up."""
    old, opt = trained_old()
    rules = {"version": 1, "rules": [*REFACTOR["rules"], {"pad": {"match": "^head\\.bias$", "to": [4], "fill": 0}}]}

    class Wide(New):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(DIM, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[..., :3]

    torch.manual_seed(1)
    new = Wide()
    new.head.weight.data = torch.zeros(4, DIM)
    sd = old.state_dict()
    like = {**sd, "fc.weight": torch.cat([sd["fc.weight"], torch.zeros(1, DIM)])}
    new_opt = adamw(new.parameters())
    assert remap.load(new, like, rules=rules).ok
    train(new, new_opt, BATCHES[3:4])
    out = remap.export(new, rules, like=like, optimizer=new_opt)
    rec = out.optimizer.target_record("fc.bias")
    assert rec.status == "reset" and "pad" in (rec.reason or "")
    assert out.optimizer.target_record("fc.weight").status == "loaded"
    position = out.optimizer_state_dict["param_groups"][0]["param_names"].index("fc.bias")
    assert position not in out.optimizer_state_dict["state"]
    assert "dropped: fc.bias" in str(out)


def test_positions_unknown_without_source_model_are_refused() -> None:
    """A key of --like that reaches nothing may be a parameter or a buffer: no order is guessed."""
    old, opt = trained_old()
    new, new_opt = resumed_new(old, opt)
    like = {**copy.deepcopy(old.state_dict()), "extra.weight": torch.zeros(2)}
    rules = {"version": 1, "rules": [*REFACTOR["rules"]], "expect": {"unused": ["extra.weight"]}}
    with pytest.raises(UsageError, match="source.model"):
        remap.export(new, rules, like=like, optimizer=new_opt)


def test_an_optimizer_over_other_parameters_is_refused() -> None:
    old, opt = trained_old()
    new, _ = resumed_new(old, opt)
    with pytest.raises(UsageError, match="not a parameter of the fine-tuned model"):
        remap.export(new, REFACTOR, like=copy.deepcopy(old.state_dict()), optimizer=adamw(Old().parameters()))


def test_a_tied_parameter_exports_its_state_once_per_original_key() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
            self.dec.weight = self.enc.weight

    model = Tied()
    rules = {"version": 1, "rules": [{"rename": {"^w$": "dec.weight"}}]}
    like = {"w": torch.randn(2, 3)}
    assert remap.load(model, like, rules=rules).ok
    opt = adamw(model.parameters())
    (model.enc(torch.randn(4, 3)) + model.dec(torch.randn(4, 3))).sum().backward()
    opt.step()
    out = remap.export(model, rules, like=like, optimizer=opt)
    assert out.optimizer_state_dict["param_groups"][0]["param_names"] == ["w"]
    assert same(out.optimizer_state_dict["state"][0], opt.state_dict()["state"][0])
