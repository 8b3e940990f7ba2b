"""Optimizer state through the plan (issue 15, items 4 and 5): ``remap.load(..., optimizer=opt)``.

The reference for every resumed run is torch itself: the unrefactored model resumed with
``optimizer.load_state_dict`` and trained on, compared with the refactored one resumed
through remap and trained on the same batches. Checkpoints are laid out as torch, Lightning
(``optimizer_states``, ``lr_schedulers``) and the Hugging Face Trainer (``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` beside the weights) write them.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator
from safetensors.torch import save_file
from torch import nn

import remap
from remap.errors import CheckError, SourceError, UsageError

HERE = __name__  # factories below are named "<this module>:Old"
DIM = 8


class Old(nn.Module):
    """Attention with separate q, k, v projections and a ``fc`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.fc = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.fc(_attend(self.q(h), self.k(h), self.v(h)))


class New(nn.Module):
    """The refactor: q, k, v fused into one ``qkv`` projection, ``fc`` renamed ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(x)).chunk(3, dim=-1)
        return self.head(_attend(q, k, v))


class Reordered(nn.Module):
    """The same layers as Old, declared v, k, q and ``fc`` renamed ``head``: as many parameters,
    of the same shapes at every position, so a position-based load succeeds silently."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.v, self.k, self.q = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(_attend(self.q(h), self.k(h), self.v(h)))


class Wrapped(nn.Module):
    """A LightningModule's view: the network under ``model.``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Old()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sigmoid attention: under a softmax the key bias has a gradient of exactly zero (a shift
    of every score), whose rounding noise Adam would blow up to full steps in both runs alike."""
    return (torch.sigmoid(q @ k.transpose(1, 2) / DIM**0.5) @ v).mean(1)


FUSE = [
    {"merge": {"match": r"^(q|k|v)\.(weight|bias)$", "group": 1, "into": r"qkv.\2", "order": ["q", "k", "v"]}},
    {"rename": {r"^fc\.": "head."}},
]
REFACTOR = {"version": 1, "rules": FUSE}
BATCHES = [(torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(i)), torch.randn(5, 3, generator=torch.Generator().manual_seed(100 + i)))
           for i in range(6)]  # fmt: skip


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def trained_old(kind: str, *, named: bool) -> tuple[Old, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Old()
    opt = make_optimizer(kind, model.named_parameters() if named else model.parameters())
    train(model, opt, BATCHES[:3])
    return model, opt


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, **extra: Any) -> Path:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, **extra}, path)
    return path


def mapped_back(new: New) -> dict[str, torch.Tensor]:
    """The refactored weights in the unrefactored names (qkv split, head named fc)."""
    sd = new.state_dict()
    out = {"embed.weight": sd["embed.weight"], "embed.bias": sd["embed.bias"], "fc.weight": sd["head.weight"], "fc.bias": sd["head.bias"]}
    for part, w, b in zip("qkv", sd["qkv.weight"].chunk(3), sd["qkv.bias"].chunk(3)):
        out[f"{part}.weight"], out[f"{part}.bias"] = w, b
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_run(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """The unrefactored run resumed by torch alone and trained 3 more steps."""
    ckpt = torch.load(path, weights_only=True)
    model = Old()
    model.load_state_dict(ckpt["model"])
    opt = make_optimizer(kind, model.parameters())
    opt.load_state_dict(ckpt["optimizer"])
    train(model, opt, BATCHES[3:])
    return model.state_dict()


def snapshot(model: nn.Module, *objects: Any) -> list[Any]:
    """Model and optimizer (or scheduler) state_dicts, deep-copied for a bit-exact comparison."""
    return [copy.deepcopy(model.state_dict()), *(copy.deepcopy(o.state_dict()) for o in objects)]


def same(a: Any, b: Any) -> bool:
    """Equal structure and bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def stepped(model: nn.Module, kind: str = "adamw") -> torch.optim.Optimizer:
    """A new optimizer that already holds state of its own, so that "untouched" means something."""
    opt = make_optimizer(kind, model.parameters())
    train(model, opt, BATCHES[5:])
    return opt


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(importlib.resources.files("remap.report").joinpath("report.schema.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the user's check


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("names", ["param_names", "source.model"])
def test_resume_through_refactor_matches_the_unrefactored_run(tmp_path: Path, kind: str, names: str) -> None:
    old, opt = trained_old(kind, named=names == "param_names")
    path = save_checkpoint(tmp_path / "ckpt.pt", old, opt)
    reference = reference_run(path, kind)

    torch.manual_seed(1)
    new = New()
    new_opt = make_optimizer(kind, new.parameters())
    rules = {**REFACTOR, "source": {"model": f"{HERE}:Old"}} if names == "source.model" else REFACTOR
    report = remap.load(new, str(path), rules=rules, optimizer=new_opt)
    assert report.ok and report.optimizer is not None and report.optimizer.names == names
    assert {t.key: t.status for t in report.optimizer.targets} == dict.fromkeys(["embed.weight", "embed.bias", "qkv.weight", "qkv.bias", "head.weight", "head.bias"], "loaded")
    train(new, new_opt, BATCHES[3:])
    assert max_diff(mapped_back(new), reference) < 1e-5

    # the check can fail: the same resume with the optimizer state left out ends elsewhere
    fresh = New()
    fresh_opt = make_optimizer(kind, fresh.parameters())
    remap.load(fresh, str(path), rules=REFACTOR)
    train(fresh, fresh_opt, BATCHES[3:])
    assert max_diff(mapped_back(fresh), reference) > 1e-3


def test_merged_moments_are_the_parts_concatenated_and_step_is_kept(tmp_path: Path) -> None:
    old, opt = trained_old("adamw", named=True)
    saved = opt.state_dict()
    index = {n: i for i, n in enumerate(saved["param_groups"][0]["param_names"])}
    new = New()
    new_opt = torch.optim.AdamW(new.parameters())
    remap.load(new, {"model": old.state_dict(), "optimizer": saved}, rules=REFACTOR, optimizer=new_opt)
    state = new_opt.state[new.qkv.weight]
    for entry in ("exp_avg", "exp_avg_sq"):
        expected = torch.cat([saved["state"][index[f"{p}.weight"]][entry] for p in "qkv"])
        assert torch.equal(state[entry], expected)
    assert torch.equal(state["step"], saved["state"][index["q.weight"]]["step"])
    assert torch.equal(new_opt.state[new.head.bias]["exp_avg"], saved["state"][index["fc.bias"]]["exp_avg"])


def test_a_position_based_load_fails_or_pairs_moments_wrongly_where_remap_pairs_them_by_name() -> None:
    old, opt = trained_old("adamw", named=False)
    saved = opt.state_dict()
    exp_avg = {name: saved["state"][i]["exp_avg"] for i, (name, _) in enumerate(old.named_parameters())}

    # the q/k/v fusion: torch's position-based load refuses (10 saved parameters, 6 new ones)
    new = New()
    with pytest.raises(ValueError, match="doesn't match the size"):
        torch.optim.AdamW(new.parameters()).load_state_dict(copy.deepcopy(saved))

    # declaring v, k, q in another order: torch loads without a word and pairs q's moments with v
    reordered = Reordered()
    blind = torch.optim.AdamW(reordered.parameters())
    blind.load_state_dict(copy.deepcopy(saved))
    assert torch.equal(blind.state[reordered.v.weight]["exp_avg"], exp_avg["q.weight"])
    assert not torch.equal(blind.state[reordered.v.weight]["exp_avg"], exp_avg["v.weight"])

    # remap names the saved positions (source.model) and pairs each moment with its own parameter
    reordered = Reordered()
    by_name = torch.optim.AdamW(reordered.parameters())
    rules = {"version": 1, "source": {"model": f"{HERE}:Old"}, "rules": [{"rename": {r"^fc\.": "head."}}]}
    remap.load(reordered, {"model": old.state_dict(), "optimizer": saved}, rules=rules, optimizer=by_name)
    for part in "qkv":
        assert torch.equal(by_name.state[getattr(reordered, part).weight]["exp_avg"], exp_avg[f"{part}.weight"])
    assert torch.equal(by_name.state[reordered.head.weight]["exp_avg"], exp_avg["fc.weight"])


def test_split_and_transpose_carry_the_moments_through_the_same_ops() -> None:
    """The other direction (one qkv into q, k, v) and a transposed weight (GPT-2's Conv1D)."""
    torch.manual_seed(2)
    new = New()
    opt = torch.optim.AdamW(new.named_parameters())
    train(new, opt, BATCHES[:2])
    saved = opt.state_dict()
    at = {n: i for i, n in enumerate(saved["param_groups"][0]["param_names"])}
    old = Old()
    rules = {"version": 1, "rules": [
        {"split": {"match": r"^qkv\.(weight|bias)$", "into": [r"q.\1", r"k.\1", r"v.\1"]}},
        {"rename": {r"^head\.": "fc."}},
        {"transpose": r"^embed\.weight$"},
    ]}  # fmt: skip
    sd = {**new.state_dict(), "embed.weight": new.state_dict()["embed.weight"].t().contiguous()}  # stored as (in, out)
    saved["state"][at["embed.weight"]] = {k: (v.t().contiguous() if v.dim() == 2 else v) for k, v in saved["state"][at["embed.weight"]].items()}
    fresh = torch.optim.AdamW(old.parameters())
    report = remap.load(old, {"model": sd, "optimizer": saved}, rules=rules, optimizer=fresh)
    assert report.ok and {t.status for t in report.optimizer.targets} == {"loaded"}  # type: ignore[union-attr]
    for n, part in enumerate("qkv"):
        assert torch.equal(fresh.state[getattr(old, part).weight]["exp_avg"], opt.state[new.qkv.weight]["exp_avg"].chunk(3)[n])
    assert torch.equal(fresh.state[old.embed.weight]["exp_avg_sq"], opt.state[new.embed.weight]["exp_avg_sq"])
    assert fresh.state[old.embed.weight]["exp_avg_sq"].is_contiguous()


def test_the_reports_group_the_optimizer_like_the_keys_and_their_counts_add_up(schema: dict[str, Any]) -> None:
    old, opt = trained_old("adamw", named=True)
    new = New()
    report = remap.load(new, {"model": old.state_dict(), "optimizer": opt.state_dict()}, rules=REFACTOR, optimizer=torch.optim.AdamW(new.parameters()))
    text = str(report)
    section = text[text.index("Optimizer: torch.optim.adamw.AdamW"):text.index("OK: loaded as declared")]
    assert "head.{bias, weight} <- fc.{bias, weight}" in section and "[cat(dim=0)[q, k, v]]" in section
    assert re.search(r"\n  loaded +6  step, exp_avg, exp_avg_sq\n", section)
    assert re.search(r"\n  saved +10  10 used, 0 discarded, 0 stateless\n", section)
    totals = report.optimizer.totals()  # type: ignore[union-attr]
    assert totals["loaded"] + totals["reset"] + totals["failed"] == totals["params"] == 6
    assert totals["saved_used"] + totals["saved_discarded"] + totals["saved_stateless"] + totals["saved_failed"] == totals["saved"] == 10
    as_json = report.to_json()
    Draft202012Validator(schema).validate(json.loads(as_json))
    assert '\n      "qkv.weight": {"status": "loaded", "group": 0, "sources": ["q.weight", "k.weight", "v.weight"]' in as_json  # one line a key
    assert json.loads(as_json)["optimizer"]["schema"] == 1


# --------------------------------------------------------------------------- what starts without state, and why


def test_lossy_ops_unfed_params_dropped_and_unoptimized_state_are_reset_or_discarded_and_reported(schema: dict[str, Any]) -> None:
    old, opt = trained_old("adamw", named=True)
    saved = opt.state_dict()

    class Grown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, DIM + 2)  # padded from DIM: a lossy op
            self.q = nn.Linear(DIM, DIM)
            self.extra = nn.Linear(DIM, DIM)  # fed by nothing

    grown = Grown()
    grown.q.requires_grad_(False)
    rules = {"version": 1, "rules": [{"drop": r"^(k|v)\."}, {"pad": {"match": r"^embed\."}}],
             "expect": {"missing": [r"^extra\."], "unused": [r"^fc\."]}}  # fmt: skip
    new_opt = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad])  # q is frozen: not in the optimizer
    report = remap.load(grown, {"model": old.state_dict(), "optimizer": saved}, rules=rules, optimizer=new_opt)
    section = report.optimizer
    assert section is not None
    targets = {t.key: t for t in section.targets}
    assert set(targets) == {"embed.weight", "embed.bias", "extra.weight", "extra.bias"}
    assert all(t.status == "reset" for t in targets.values()) and not new_opt.state
    assert "pad" in (targets["embed.weight"].reason or "")
    assert "no source key feeds it" in (targets["extra.weight"].reason or "")
    sources = {s.key: s for s in section.sources}
    assert len(sources) == len(saved["param_groups"][0]["params"])  # every saved entry accounted for
    assert "dropped by step 1" in (sources["k.weight"].reason or "") and sources["k.weight"].fate == "discarded"
    assert "not in the new optimizer" in (sources["q.weight"].reason or "") and sources["q.weight"].targets == ("q.weight",)
    assert "unused" in (sources["fc.weight"].reason or "")
    assert "reset" in (sources["embed.weight"].reason or "")
    Draft202012Validator(schema).validate(json.loads(report.to_json()))
    text = str(report)
    assert "Optimizer: torch.optim.adamw.AdamW" in text and "reset" in text and "dropped by step 1" in text


def test_merged_parts_whose_step_differ_are_reset_with_a_note() -> None:
    old, opt = trained_old("adamw", named=True)
    saved = opt.state_dict()
    k = saved["param_groups"][0]["param_names"].index("k.weight")
    saved["state"][k]["step"] = saved["state"][k]["step"] + 1
    new = New()
    new_opt = torch.optim.AdamW(new.parameters())
    report = remap.load(new, {"model": old.state_dict(), "optimizer": saved}, rules=REFACTOR, optimizer=new_opt)
    rec = report.optimizer.target_record("qkv.weight")  # type: ignore[union-attr]
    assert rec.status == "reset" and "'step' differ" in (rec.reason or "")
    assert new.qkv.weight not in new_opt.state and new.qkv.bias in new_opt.state


# --------------------------------------------------------------------------- hyperparameters and what is passed through


def test_hparams_come_from_the_new_optimizer_unless_the_checkpoint_is_asked_for() -> None:
    old, opt = trained_old("adamw", named=True)
    ckpt = {"model": old.state_dict(), "optimizer": opt.state_dict()}
    new = New()
    keep = torch.optim.AdamW(new.parameters(), lr=1e-3)
    report = remap.load(new, ckpt, rules=REFACTOR, optimizer=keep)
    assert keep.param_groups[0]["lr"] == 1e-3
    assert report.optimizer.groups[0].hparams_from == "new" and "lr" in report.optimizer.groups[0].differs  # type: ignore[union-attr]
    take = torch.optim.AdamW(new.parameters(), lr=1e-3)
    report = remap.load(new, ckpt, rules={**REFACTOR, "source": {"optimizer": {"hparams": "checkpoint"}}}, optimizer=take)
    assert take.param_groups[0]["lr"] == 0.05 and take.param_groups[0]["weight_decay"] == 0.1
    assert "param_names" not in take.param_groups[0]  # the saved names are the old model's: never copied


def test_lightning_layout_optimizer_states_by_index_scheduler_and_precision_state(tmp_path: Path) -> None:
    torch.manual_seed(3)
    module = Wrapped()
    # configure_optimizers returning two optimizers, built from named parameters (torch >= 2.5 saves the names)
    body = torch.optim.AdamW(module.model.embed.named_parameters(prefix="model.embed"), lr=0.01)
    head = torch.optim.SGD([(n, p) for n, p in module.named_parameters() if not n.startswith("model.embed.")], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(head, step_size=1, gamma=0.5)
    for x, y in BATCHES[:2]:
        body.zero_grad(), head.zero_grad()
        ((module.model(x) - y) ** 2).mean().backward()
        body.step(), head.step(), sched.step()
    scaler_state = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 3}
    ckpt = {  # as lightning.pytorch's _CheckpointConnector.dump_checkpoint lays it out
        "epoch": 0, "global_step": 2, "pytorch-lightning_version": "2.4.0", "state_dict": module.state_dict(),
        "loops": {"fit_loop": {}}, "callbacks": {}, "optimizer_states": [body.state_dict(), head.state_dict()],
        "lr_schedulers": [sched.state_dict()], "MixedPrecision": scaler_state,
    }  # fmt: skip
    path = tmp_path / "epoch=0-step=2.ckpt"
    torch.save(ckpt, path)
    new = New()
    new_head = torch.optim.SGD([*new.qkv.parameters(), *new.head.parameters()], lr=0.1, momentum=0.9)
    new_sched = torch.optim.lr_scheduler.StepLR(new_head, step_size=1, gamma=0.5)
    rules = {"version": 1, "source": {"optimizer": "optimizer_states.1"}, "rules": [{"strip_prefix": "model."}, *FUSE]}
    report = remap.load(new, str(path), rules=rules, optimizer=new_head, scheduler=new_sched, optimizer_hparams="checkpoint")
    section = report.optimizer
    assert section is not None and section.source["key"] == "optimizer_states.1"
    assert {t.key for t in section.targets if t.status == "loaded"} == {"qkv.weight", "qkv.bias", "head.weight", "head.bias"}
    saved_head = head.state_dict()["state"]
    assert torch.equal(new_head.state[new.head.weight]["momentum_buffer"], saved_head[6]["momentum_buffer"])
    assert new_sched.state_dict()["last_epoch"] == 2 and new_head.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    values = section.passthrough_values
    assert values["MixedPrecision"] == scaler_state and values["lr_schedulers"][0]["last_epoch"] == 2
    roles = {p.name: (p.role, p.loaded) for p in section.passthrough}
    assert roles == {"lr_schedulers": ("lr_scheduler", True), "MixedPrecision": ("grad_scaler", False)}
    # none named: the first of the two is taken, and the report says how to take the other
    other = New()
    first = torch.optim.AdamW(other.embed.parameters())
    report = remap.load(other, str(path), rules={**rules, "source": {}}, optimizer=first)
    assert report.optimizer is not None and report.optimizer.source["key"] == "optimizer_states" and report.optimizer.source["detected"]
    assert any("holds 2 optimizer states; the first was taken (`source.optimizer: optimizer_states.1`" in n for n in report.optimizer.notes)
    assert torch.equal(first.state[other.embed.bias]["exp_avg"], body.state[module.model.embed.bias]["exp_avg"])


def hf_trainer_folder(tmp_path: Path) -> tuple[Path, Old, torch.optim.Optimizer, list[list[str]]]:
    """A Trainer's checkpoint-N folder: model.safetensors, and optimizer.pt with the two param
    groups transformers' Trainer.create_optimizer makes (weights that decay, then biases and
    norms with weight_decay 0, each in named_parameters order, no param_names), scheduler.pt,
    scaler.pt and rng_state.pth (_save_rng_state's python/numpy/cpu states)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(4)
    model = Old()
    decay = [n for n, _ in model.named_parameters() if not n.endswith("bias")]
    rest = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.1},
                             {"params": [params[n] for n in rest], "weight_decay": 0.0}], lr=0.05)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for x, y in BATCHES[:3]:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step(), sched.step()
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    torch.save({"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}, folder / "scaler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    return folder, model, opt, [decay, rest]


def test_hf_trainer_folder_without_names_fails_and_says_what_to_give_then_loads_with_names(tmp_path: Path) -> None:
    folder, old, opt, groups = hf_trainer_folder(tmp_path)
    new = New()
    new_opt = stepped(new)
    before = snapshot(new, new_opt)
    rules = {**REFACTOR, "source": {"model": f"{HERE}:Old"}}
    with pytest.raises(UsageError, match="2 param groups .* param_names") as info:
        remap.load(new, str(folder), rules=rules, optimizer=new_opt)
    assert "optimizer_state=" in str(info.value)
    assert same(snapshot(new, new_opt), before)

    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    for group, names in zip(saved["param_groups"], groups):
        group["param_names"] = names  # the names the Trainer's rule gave each group, in its order
    new_opt = torch.optim.AdamW(new.parameters(), lr=0.05)
    report = remap.load(new, str(folder), rules=REFACTOR, optimizer=new_opt, optimizer_state=saved)
    section = report.optimizer
    assert section is not None and section.names == "param_names"
    assert {t.status for t in section.targets} == {"loaded"}
    assert section.groups[0].checkpoint_groups == (0, 1)  # one new group took both saved groups' parameters
    q = groups[0].index("q.weight")
    assert torch.equal(new_opt.state[new.qkv.weight]["exp_avg"][:DIM], saved["state"][q]["exp_avg"])


def test_hf_trainer_optimizer_pt_beside_a_folder_is_detected_and_side_files_pass_through(tmp_path: Path, schema: dict[str, Any]) -> None:
    folder, old, opt, groups = hf_trainer_folder(tmp_path)
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    for group, names in zip(saved["param_groups"], groups):
        group["param_names"] = names
    torch.save(saved, folder / "optimizer.pt")  # a Trainer whose optimizer was built from named parameters
    new = New()
    params = dict(new.named_parameters())  # the Trainer's two groups again, over the new model
    new_opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if not n.endswith("bias")], "weight_decay": 0.1},
                                 {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0}])  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lambda step: 1.0 / (step + 1))
    report = remap.load(new, str(folder), rules=REFACTOR, optimizer=new_opt, scheduler=sched, optimizer_hparams="checkpoint")
    section = report.optimizer
    assert section is not None and section.source == {"kind": "file", "path": str(folder / "optimizer.pt"), "key": None, "detected": True}
    assert any("beside the weights" in n for n in section.notes)
    assert {p.name: p.role for p in section.passthrough} == {"rng_state.pth": "rng_state", "scaler.pt": "grad_scaler", "scheduler.pt": "lr_scheduler"}
    rng = section.passthrough_values["rng_state.pth"]
    assert torch.equal(rng["cpu"], torch.load(folder / "rng_state.pth", weights_only=False)["cpu"])
    assert sched.last_epoch == 3 and new_opt.param_groups[0]["lr"] == pytest.approx(0.05 / 4)
    Draft202012Validator(schema).validate(json.loads(report.to_json()))
    # the same file named in the rules, relative to the rules file
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("version: 1\nsource: {path: checkpoint-3, optimizer: checkpoint-3/optimizer.pt}\n"
                          + "rules:\n" + "".join(f"  - {json.dumps(s)}\n" for s in FUSE))  # fmt: skip
    model = New()
    again = torch.optim.AdamW(model.parameters())
    report = remap.load(model, rules=str(rules_file), optimizer=again)
    assert report.optimizer is not None and report.optimizer.source["detected"] is False and len(again.state) == 6


# --------------------------------------------------------------------------- failures leave both untouched


def _corrupt_shape(saved: dict[str, Any]) -> None:
    saved["state"][saved["param_groups"][0]["param_names"].index("k.weight")]["exp_avg"] = torch.zeros(DIM, DIM + 1)


def _stranger_name(saved: dict[str, Any]) -> None:
    saved["param_groups"][0]["param_names"][0] = "module.embed.weight"


def _unlisted_state(saved: dict[str, Any]) -> None:
    saved["state"][99] = {"step": torch.tensor(1.0)}


def _list_state(saved: dict[str, Any]) -> None:
    saved["state"][0]["history"] = [torch.zeros(1)]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_shape, r"'exp_avg' of 'k.weight' .* has shape \[8, 9\] but the parameter is \[8, 8\]"),
        (_stranger_name, r"not keys of the source: 'module.embed.weight'; the closest source keys"),
        (_unlisted_state, "state for id 99, which no param group lists"),
        (_list_state, "is a list, which remap cannot map"),
    ],
)
def test_a_saved_state_that_does_not_fit_fails_and_leaves_model_and_optimizer_bit_identical(corrupt: Any, message: str) -> None:
    old, opt = trained_old("adamw", named=True)
    saved = copy.deepcopy(opt.state_dict())
    corrupt(saved)
    new = New()
    new_opt = stepped(new)
    before = snapshot(new, new_opt)
    with pytest.raises(CheckError, match=message) as info:
        remap.load(new, {"model": old.state_dict(), "optimizer": saved}, rules=REFACTOR, optimizer=new_opt)
    assert {f.kind for f in info.value.report.failures} == {"optimizer"} and "not touched" in str(info.value)
    assert info.value.report.optimizer is not None
    assert same(snapshot(new, new_opt), before)


def test_missing_names_fail_and_say_what_to_provide() -> None:
    old, opt = trained_old("sgd", named=False)
    new = New()
    new_opt = stepped(new, "sgd")
    before = snapshot(new, new_opt)
    with pytest.raises(UsageError, match="without their names; remap never pairs them by guessing. Set `source.model`"):
        remap.load(new, {"model": old.state_dict(), "optimizer": opt.state_dict()}, rules=REFACTOR, optimizer=new_opt)
    assert same(snapshot(new, new_opt), before)


def test_checkpoint_hparams_of_two_differing_groups_for_one_new_group_fail() -> None:
    torch.manual_seed(5)
    old = Old()
    names = [n for n, _ in old.named_parameters()]
    opt = torch.optim.AdamW([{"params": [(n, p) for n, p in old.named_parameters() if n.startswith(("embed", "q", "fc"))], "lr": 0.1},
                             {"params": [(n, p) for n, p in old.named_parameters() if n.startswith(("k", "v"))], "lr": 0.2}])  # fmt: skip
    train(old, opt, BATCHES[:1])
    new = New()
    new_opt = stepped(new)
    before = snapshot(new, new_opt)
    ckpt = {"model": old.state_dict(), "optimizer": opt.state_dict()}
    with pytest.raises(CheckError, match="saved groups 0, 1, whose hyperparameters differ"):
        remap.load(new, ckpt, rules=REFACTOR, optimizer=new_opt, optimizer_hparams="checkpoint")
    assert same(snapshot(new, new_opt), before)
    assert len(names) == 10
    remap.load(new, ckpt, rules=REFACTOR, optimizer=new_opt)  # from the new optimizer: fine


def test_a_module_load_that_fails_after_the_optimizer_was_loaded_puts_both_back(tmp_path: Path) -> None:
    old, opt = trained_old("adamw", named=True)
    path = save_checkpoint(tmp_path / "ckpt.pt", old, opt)
    new = New()
    new_opt = stepped(new)
    sched = torch.optim.lr_scheduler.StepLR(new_opt, step_size=1)
    train(new, new_opt, BATCHES[4:5])
    sched.step()
    before = snapshot(new, new_opt, sched)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "lr_scheduler": torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 5).state_dict()}, path)

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the module's load, after the optimizer was loaded

    with pytest.raises(KeyboardInterrupt):
        remap.load(new, str(path), rules=REFACTOR, optimizer=new_opt, scheduler=sched, progress=interrupted)
    assert same(snapshot(new, new_opt, sched), before)
    report = remap.load(new, str(path), rules=REFACTOR, optimizer=new_opt, scheduler=sched)  # and it loads when nothing interrupts
    assert report.ok and sched.step_size == 5


def test_dry_run_reports_the_optimizer_and_writes_nothing() -> None:
    old, opt = trained_old("adamw", named=True)
    new = New()
    new_opt = stepped(new)
    before = snapshot(new, new_opt)
    report = remap.load(new, {"model": old.state_dict(), "optimizer": opt.state_dict()}, rules=REFACTOR, optimizer=new_opt, dry_run=True)
    assert report.dry_run and report.optimizer is not None and report.optimizer.totals()["loaded"] == 6
    assert same(snapshot(new, new_opt), before)


def test_wrong_arguments_are_usage_errors() -> None:
    old, opt = trained_old("adamw", named=True)
    ckpt = {"model": old.state_dict(), "optimizer": opt.state_dict()}
    new = New()
    with pytest.raises(UsageError, match="need optimizer="):
        remap.load(new, ckpt, rules=REFACTOR, optimizer_hparams="checkpoint")
    with pytest.raises(UsageError, match="not parameters of the module"):
        remap.load(new, ckpt, rules=REFACTOR, optimizer=torch.optim.AdamW([nn.Parameter(torch.zeros(2))]))
    with pytest.raises(UsageError, match="optimizer_hparams: expected one of new, checkpoint"):
        remap.load(new, ckpt, rules=REFACTOR, optimizer=torch.optim.AdamW(new.parameters()), optimizer_hparams="old")
    with pytest.raises(UsageError, match="no saved optimizer state was found"):
        remap.load(new, {"model": old.state_dict()}, rules=REFACTOR, optimizer=torch.optim.AdamW(new.parameters()))
    with torch.device("meta"):
        ghost = New()
    with pytest.raises(UsageError, match="needs a module with its memory"):
        remap.load(ghost, ckpt, rules=REFACTOR, optimizer=torch.optim.AdamW(ghost.parameters()))


@pytest.mark.hostile
@pytest.mark.parametrize(
    "bad",
    [
        {"state": {}, "param_groups": "all"},
        {"state": {}, "param_groups": [{"params": ["0"]}]},
        {"state": [], "param_groups": [{"params": [0]}]},
        {"state": {0: 3}, "param_groups": [{"params": [0]}]},
        {"state": {}, "param_groups": [{"params": [0, 0], "param_names": ["a", "b"]}]},
        {"state": {}, "param_groups": [{"params": [0], "param_names": ["a", "b"]}]},
    ],
    ids=["groups-not-a-list", "ids-not-ints", "state-not-a-dict", "entry-not-a-dict", "id-twice", "names-count"],
)
def test_malformed_optimizer_states_are_source_errors_and_touch_nothing(tmp_path: Path, bad: dict[str, Any]) -> None:
    old, _ = trained_old("adamw", named=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": old.state_dict(), "optimizer": bad}, path)
    new = New()
    new_opt = stepped(new)
    before = snapshot(new, new_opt)
    with pytest.raises(SourceError) as info:
        remap.load(new, str(path), rules=REFACTOR, optimizer=new_opt)
    assert info.value.exit_code == 3 and str(path) in str(info.value)
    assert same(snapshot(new, new_opt), before)


@pytest.mark.hostile
def test_an_optimizer_file_that_needs_a_pickle_is_refused(tmp_path: Path) -> None:
    old, opt = trained_old("adamw", named=True)
    bad = tmp_path / "optimizer.pt"
    torch.save({**opt.state_dict(), "note": Old}, bad)  # a global that torch.load(weights_only=True) refuses
    new = New()
    with pytest.raises(SourceError, match="refused this pickle"):
        remap.load(new, {"model": old.state_dict()}, rules=REFACTOR, optimizer=torch.optim.AdamW(new.parameters()), optimizer_state=str(bad))


def test_permute_heads_carries_the_moments_row_for_row_like_the_weight() -> None:
    """A RoPE layout change (rows permuted within each head) moves each moment's rows with its
    weight's: with moments equal to the weights, the new moments equal the loaded weights."""
    old = torch.nn.Linear(4, 16, bias=False)
    opt = torch.optim.AdamW(old.parameters())
    old(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0]["param_names"] = ["weight"]
    saved["state"][0]["exp_avg"] = old.weight.detach().clone()
    saved["state"][0]["exp_avg_sq"] = old.weight.detach().clone() ** 2
    rules = {"version": 1, "rules": [{"permute_heads": {"match": r"^weight$", "heads": 2, "to": "half_split"}}]}
    new = torch.nn.Linear(4, 16, bias=False)
    new_opt = torch.optim.AdamW(new.parameters())
    report = remap.load(new, {"model": old.state_dict(), "optimizer": saved}, rules=rules, optimizer=new_opt)
    assert report.ok and {t.key: t.status for t in report.optimizer.targets} == {"weight": "loaded"}
    assert not torch.equal(new.weight, old.weight)  # rows really moved
    state = new_opt.state[new.weight]
    assert torch.equal(state["exp_avg"], new.weight) and torch.equal(state["exp_avg_sq"], new.weight.detach() ** 2)
