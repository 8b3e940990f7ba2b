"""Coverage: which loaded tensors a verify check can vouch for.

The issue's case first: a timm ResNet keeps its default zero-initialised last BatchNorm
gamma in every residual block, two blocks' ``conv1`` are swapped, and the outputs still
agree (torch shows it); the check names the weights it cannot see. The expected sets come
from the architecture (what a zero gamma, a dead ReLU, an unused head cut off), never from
the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from remap.errors import RulesError, UsageError
from remap.verifying.coverage import check_coverage, describe_coverage


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy machine, tiny convolutions on several threads wait on each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_inputs(*shape: int) -> tuple[tuple[list, dict], tuple[list, dict]]:
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(*shape, generator=g)], {}), ([torch.randn(*shape, generator=g)], {})


def coverage(model: nn.Module, *shape: int, **kwargs):
    return check_coverage(model, *seeded_inputs(*shape), keys=list(model.state_dict()), **kwargs)


def tiny_resnet(**kwargs) -> nn.Module:
    """resnet18d's structure (BasicBlock, [2, 2, 2, 2], the deep stem) with timm's own
    default init, narrow enough to run in milliseconds: the stem gives layer1 its own width,
    so its two blocks' conv1 have one shape, as in resnet18."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, channels=(8, 16, 32, 64), stem_type="deep", stem_width=4, **kwargs).eval()


def block_names(model: nn.Module) -> list[str]:
    from timm.models.resnet import BasicBlock

    return [name for name, m in model.named_modules() if isinstance(m, BasicBlock)]


def floating_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


# --------------------------------------------------------------------------- the case


def test_swapped_conv1_in_a_zero_init_resnet_agrees_but_is_uncovered():
    original = tiny_resnet()
    blocks = block_names(original)
    assert len(blocks) == 8
    assert all(float(original.get_submodule(b).bn2.weight.detach().abs().max()) == 0.0 for b in blocks)  # timm's zero_init_last
    state = original.state_dict()
    a, b = "layer1.0.conv1.weight", "layer1.1.conv1.weight"
    assert not torch.equal(state[a], state[b])
    swapped = {**state, a: state[b].clone(), b: state[a].clone()}
    converted = copy.deepcopy(original)
    converted.load_state_dict(swapped)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=1e-6, rtol=0)  # plain verify is blind to the swap

    cov = coverage(converted, 2, 3, 16, 16)

    # gamma = 0 makes bn2's output its bias: nothing before it in the residual branch, nor bn2's statistics, reaches the output.
    hidden = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "conv2.weight",
              "bn2.running_mean", "bn2.running_var"]  # fmt: skip
    expected = {f"{blk}.{leaf}" for blk in blocks for leaf in hidden}
    assert {a, b} <= set(cov["uncovered"])
    assert set(cov["uncovered"]) == expected
    assert cov["method"] == "gradient" and cov["input_sensitive"] and cov["input_spread"] > 1e-6
    assert {u["key"] for u in cov["unmeasurable"]} == {k for k in state if k.endswith("num_batches_tracked")}
    assert all("int64" in u["reason"] for u in cov["unmeasurable"])
    assert cov["checked"] == len(floating_keys(converted))
    line = describe_coverage(cov)
    assert "layer{1..4}.{0, 1}.conv{1, 2}.weight" in line and f"{len(expected)} of {cov['checked']}" in line
    assert line.endswith(f"; {len(cov['unmeasurable'])} integer tensor(s) not measured")


def test_a_resnet_with_nonzero_gammas_is_covered_everywhere():
    model = tiny_resnet(zero_init_last=False)
    assert all(float(model.get_submodule(b).bn2.weight.detach().abs().min()) > 0 for b in block_names(model))
    cov = coverage(model, 2, 3, 16, 16)
    assert cov["uncovered"] == [] and cov["declared"] == []
    assert cov["checked"] == len(floating_keys(model))
    assert describe_coverage(cov).startswith(f"coverage (gradient): all {cov['checked']} tensor(s) influence the outputs")


# --------------------------------------------------------------------------- weights the outputs cannot see


class DeadHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux_head = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))  # aux_head is loaded, never run


class DeadReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.hidden, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        with torch.no_grad():
            self.hidden.bias.fill_(-1e3)  # far below anything the weights can reach

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) + torch.relu(self.hidden(x)))


class ZeroGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.main, self.branch = nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
        self.gate = nn.Parameter(torch.zeros(()))  # a residual gate initialised to zero

    def forward(self, x):
        return self.main(x) + self.gate * self.branch(x)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (DeadHead, ["aux_head.weight", "aux_head.bias"]),
        (DeadReLU, ["hidden.weight", "hidden.bias"]),
        (ZeroGate, ["branch.0.weight", "branch.0.bias", "branch.2.weight", "branch.2.bias"]),
    ],
)
def test_dead_branches_are_uncovered(model, expected):
    torch.manual_seed(0)
    m = model()
    cov = coverage(m, 5, 4)
    assert cov["uncovered"] == expected
    assert cov["checked"] == len(m.state_dict()) and cov["unmeasurable"] == []
    assert cov["input_sensitive"]


def test_dead_relu_is_truly_dead_and_the_gate_is_covered():
    torch.manual_seed(0)
    m = DeadReLU()
    x = seeded_inputs(5, 4)[0][0][0]
    assert float(m.hidden(x).detach().max()) < 0  # the premise, from torch
    cov = coverage(ZeroGate(), 5, 4)
    assert "gate" not in cov["uncovered"]  # its own gradient is branch(x): the gate itself is seen


def test_declared_patterns_move_keys_from_uncovered_to_declared():
    torch.manual_seed(0)
    cov = coverage(DeadHead(), 5, 4, declared=[r"aux_head\.w"])
    assert cov["uncovered"] == ["aux_head.bias"] and cov["declared"] == ["aux_head.weight"]
    cov = coverage(DeadHead(), 5, 4, declared=[r"^aux_head\."])
    assert cov["uncovered"] == [] and cov["declared"] == ["aux_head.weight", "aux_head.bias"]
    assert "2 declared uncovered" in describe_coverage(cov)
    cov = coverage(DeadHead(), 5, 4, declared=[r"^head\."])  # matches covered keys only: nothing moves
    assert cov["uncovered"] == ["aux_head.weight", "aux_head.bias"] and cov["declared"] == []
    with pytest.raises(RulesError, match=r"verify.uncovered: bad regex '\('"):
        coverage(DeadHead(), 5, 4, declared=["("])


def test_only_loaded_keys_are_reported():
    torch.manual_seed(0)
    m = DeadHead()
    cov = check_coverage(m, *seeded_inputs(5, 4), keys=["body.weight", "aux_head.bias", "nowhere.weight"])
    assert cov["uncovered"] == ["aux_head.bias"] and cov["checked"] == 2
    assert [u["key"] for u in cov["unmeasurable"]] == ["nowhere.weight"]
    assert "; 1 unmeasurable: nowhere.weight" in describe_coverage(cov)


# --------------------------------------------------------------------------- inputs that change nothing


def test_outputs_that_do_not_depend_on_the_input_are_reported():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert coverage(m, 5, 4)["input_sensitive"]  # the same model before its last weight is zeroed
    with torch.no_grad():
        m[2].weight.zero_()
    cov = coverage(m, 5, 4)
    assert cov["input_sensitive"] is False and cov["input_spread"] == 0.0
    assert cov["uncovered"] == ["0.weight", "0.bias"]
    assert "the outputs do not depend on the input" in describe_coverage(cov)


def test_input_spread_is_the_largest_difference_between_the_two_outputs():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    (x, _), (y, _) = seeded_inputs(5, 4)
    with torch.no_grad():
        expected = float((m(x[0]) - m(y[0])).abs().max())
    assert coverage(m, 5, 4)["input_spread"] == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- outputs whose sum hides the weights


class Centred(nn.Module):
    """What a LayerNorm does first: the outputs minus their mean, whose sum is always zero."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        z = self.lin(x)
        return z - z.mean(-1, keepdim=True)


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x):
        return torch.softmax(self.lin(x), dim=-1)


def test_a_plain_sum_misses_centred_outputs_the_projection_does_not():
    torch.manual_seed(0)
    m = Centred()
    x = seeded_inputs(3, 4)[0][0][0]
    grads = torch.autograd.grad(m(x).sum(), [m.lin.weight, m.lin.bias])
    assert all(float(g.abs().max()) == 0.0 for g in grads)  # a sum sees nothing
    cov = coverage(m, 3, 4)
    assert cov["uncovered"] == [] and cov["method"] == "gradient"
    assert cov["perturbed"] == 0  # the gradient saw both, no perturbation had to


def test_a_parameter_feeding_only_a_softmax_is_covered():
    torch.manual_seed(0)
    m = Softmaxed()
    x = seeded_inputs(3, 4)[0][0][0]
    plain = torch.autograd.grad(m(x).sum(), [m.lin.weight])[0]
    assert float(plain.abs().max()) < 1e-6  # rounding noise only: the sum of a softmax is 1
    cov = coverage(m, 3, 4)
    assert cov["uncovered"] == [] and cov["perturbed"] == 0 and cov["checked"] == 2


# --------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.mix(x))  # the embedding table is read only through the head


def test_a_tied_tensor_covered_under_one_name_is_covered_under_all():
    torch.manual_seed(0)
    assert coverage(TiedLM(tie=False), 2, 4)["uncovered"] == ["embed.weight"]  # untied, the table is unused
    m = TiedLM(tie=True)
    assert set(m.state_dict()) == {"embed.weight", "mix.weight", "mix.bias", "head.weight"}
    cov = coverage(m, 2, 4)
    assert cov["uncovered"] == [] and cov["checked"] == 4
    cov = check_coverage(m, *seeded_inputs(2, 4), keys=["embed.weight"])  # only this name was loaded
    assert cov["uncovered"] == [] and cov["checked"] == 1


# --------------------------------------------------------------------------- where autograd cannot run


class ArgmaxOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 9), nn.Linear(4, 9)

    def forward(self, x):
        return self.used(x).argmax(-1)


class NoGradInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            return self.used(x)


@pytest.mark.parametrize("model", [ArgmaxOut, NoGradInside])
def test_without_a_gradient_a_perturbation_measures(model):
    torch.manual_seed(0)
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cov = coverage(m, 64, 4)  # enough rows that a 10% change of a weight flips some argmax
    assert cov["method"] == "perturbation"
    assert cov["uncovered"] == ["unused.weight", "unused.bias"]
    assert cov["perturbed"] == 4 and cov["input_sensitive"]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # restored bit for bit


class StopGradient(nn.Module):
    """A straight-through path: the first layer reaches the output, its gradient does not."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.second(self.first(x).detach())


def test_a_detach_does_not_read_as_uncovered():
    torch.manual_seed(0)
    m = StopGradient()
    x = seeded_inputs(3, 4)[0][0][0]
    assert torch.autograd.grad(m(x).sum(), [m.first.weight], allow_unused=True)[0] is None  # autograd alone is blind
    cov = coverage(m, 3, 4)
    assert cov["method"] == "gradient" and cov["uncovered"] == [] and cov["perturbed"] == 2


def test_integer_buffers_are_unmeasurable_with_their_reason():
    m = nn.BatchNorm1d(3).eval()
    m.register_buffer("index", torch.arange(3))
    cov = coverage(m, 4, 3)
    assert {u["key"]: u["reason"] for u in cov["unmeasurable"]} == {
        "num_batches_tracked": "int64 tensor: no gradient, cannot be perturbed",
        "index": "int64 tensor: no gradient, cannot be perturbed",
    }
    assert cov["uncovered"] == [] and cov["checked"] == 4  # weight, bias and both running statistics


# --------------------------------------------------------------------------- the module comes back as it came


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "buffer_flags": {k: b.requires_grad for k, b in model.named_buffers()},
        "grads": {k: (id(p.grad), None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a floating tensor (NaN payloads and -0.0 included), the tensor otherwise."""
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def assert_same(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["objects"] == before["objects"] and after["flags"] == before["flags"]
    assert after["buffer_flags"] == before["buffer_flags"] and after["training"] == before["training"]
    for k, v in before["state"].items():
        assert v.dtype == after["state"][k].dtype and torch.equal(bits(v), bits(after["state"][k])), k
    for k, (ident, grad) in before["grads"].items():
        assert after["grads"][k][0] == ident and (grad is None or torch.equal(grad, after["grads"][k][1])), k


def mixed_model() -> nn.Module:
    """Training mode with one submodule in eval, a frozen parameter, a .grad already there, BatchNorm."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 3))
    m.train()
    m[1].eval()
    m[0].bias.requires_grad_(False)
    m[3].weight.grad = torch.ones_like(m[3].weight)
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
    return m


def test_the_module_is_left_as_it_was():
    m = mixed_model()
    before = snapshot(m)
    cov = coverage(m, 5, 4)
    assert cov["uncovered"] == [] and cov["perturbed"] == 2  # the BatchNorm statistics, by perturbation
    assert_same(m, before)
    cov = coverage(m, 5, 4)  # and again: the first check left nothing behind that changes the second
    assert cov["uncovered"] == []
    assert_same(m, before)


class Raising(nn.Module):
    def __init__(self, when_grad_only: bool):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
        self.when_grad_only = when_grad_only

    def forward(self, x):
        if torch.is_grad_enabled() or not self.when_grad_only:
            raise ValueError("this model does not run here")
        return self.bn(self.lin(x))


def test_a_raising_model_is_left_as_it_was():
    torch.manual_seed(0)
    m = Raising(when_grad_only=False).train()
    m.lin.weight.grad = torch.zeros_like(m.lin.weight)
    before = snapshot(m)
    with pytest.raises(UsageError, match="target model failed on the verify input: ValueError: this model does not run here"):
        coverage(m, 5, 4)
    assert_same(m, before)


def test_a_model_that_refuses_autograd_falls_back_and_is_left_as_it_was():
    torch.manual_seed(0)
    m = Raising(when_grad_only=True).train()
    before = snapshot(m)
    cov = coverage(m, 5, 4)
    assert cov["method"] == "perturbation" and cov["uncovered"] == [] and cov["checked"] == 6
    assert_same(m, before)
