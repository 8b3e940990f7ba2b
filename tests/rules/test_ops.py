"""Every tensor op against its reference formulation, and its shape function against the
real output shape. References are written independently of remap: numpy indexing,
explicit formulas, ``torch.nn.functional.interpolate`` on the reshaped grid, and timm's
``adapt_input_conv`` / ``resample_abs_pos_embed``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from remap.rules import ops
from remap.rules.ops import OpError


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def same(out: torch.Tensor, ref: torch.Tensor | np.ndarray) -> None:
    """Equal shape, dtype and values (bitwise); the output is contiguous."""
    ref = torch.from_numpy(np.ascontiguousarray(ref)) if isinstance(ref, np.ndarray) else ref
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.equal(out, ref)
    assert out.is_contiguous()


def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(OpError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- transpose

TRANSPOSES = [
    pytest.param((3, 4), (-2, -1), id="2d-default"),
    pytest.param((3, 4), (1, 0), id="2d-swap"),
    pytest.param((2, 3, 4), (0, 2), id="3d-swap"),
    pytest.param((2, 3, 4), (-1, 0), id="3d-negative"),
    pytest.param((2, 3, 4, 5), (0, 2, 3, 1), id="permute-nchw-nhwc"),
    pytest.param((2, 3, 4), (2, 0, 1), id="permute-3d"),
    pytest.param((2, 3, 4), (-1, -3, -2), id="permute-negative"),
]


@pytest.mark.parametrize(("shape", "dims"), TRANSPOSES)
def test_transpose(shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    t = rand(*shape)
    a = t.numpy()
    ref = np.swapaxes(a, *dims) if len(dims) == 2 else np.transpose(a, dims)
    out = ops.transpose(t, dims)
    same(out, ref)
    assert ops.transpose_shape(shape, dims) == tuple(out.shape)


TRANSPOSE_ERRORS = [
    pytest.param((5,), (-2, -1), "cannot transpose a 1-d tensor of shape [5]", id="1d"),
    pytest.param((), (-2, -1), "cannot transpose a 0-d tensor of shape []", id="0d"),
    pytest.param((3, 4), (0, 2), "dim 2 is out of range for a 2-d tensor", id="out-of-range"),
    pytest.param((3, 4), (-3, 0), "dim -3 is out of range for a 2-d tensor", id="negative-out-of-range"),
    pytest.param((3, 4), (0, -2), "dims [0, -2] name the same dim of shape [3, 4] twice: nothing to swap", id="same-dim"),
    pytest.param((2, 3, 4), (0, 0, 1), "permutation [0, 0, 1] does not name each of the 3 dims of shape [2, 3, 4] once", id="perm-repeat"),
    pytest.param((2, 3, 4, 5), (0, 1, 2), "permutation [0, 1, 2] does not name each of the 4 dims of shape [2, 3, 4, 5] once", id="perm-short"),
]


@pytest.mark.parametrize(("shape", "dims", "message"), TRANSPOSE_ERRORS)
def test_transpose_errors(shape: tuple[int, ...], dims: tuple[int, ...], message: str) -> None:
    assert raises(ops.transpose_shape, shape, dims) == message


# --------------------------------------------------------------------------- reshape

RESHAPES = [
    pytest.param((3, 4), (12,), id="flatten"),
    pytest.param((3, 4), (-1,), id="flatten-infer"),
    pytest.param((3, 4), (2, -1, 3), id="infer-middle"),
    pytest.param((768 // 64, 768 // 64), (12, 12, 1, 1), id="linear-to-1x1-conv"),
    pytest.param((8, 4, 1, 1), (8, -1), id="1x1-conv-to-linear"),
    pytest.param((2, 3, 4), (6, -1), id="merge-leading"),
    pytest.param((0, 5), (-1, 5), id="empty"),
]


@pytest.mark.parametrize(("shape", "new"), RESHAPES)
def test_reshape(shape: tuple[int, ...], new: tuple[int, ...]) -> None:
    t = rand(*shape)
    planned = ops.reshape_shape(shape, new)
    out = ops.reshape(t, planned)  # the engine runs the op with the planned shape
    same(out, t.numpy().reshape(new))
    assert planned == tuple(out.shape)
    assert -1 not in planned


RESHAPE_ERRORS = [
    pytest.param((3, 4), (5, 5), "cannot reshape [3, 4] (12 elements) to [5, 5] (25 elements)", id="element-count"),
    pytest.param((3, 4), (5, -1), "cannot reshape [3, 4] (12 elements) to [5, -1]: 12 is not a multiple of 5", id="infer-not-multiple"),
    pytest.param((3, 4), (0, -1), "cannot reshape [3, 4] (12 elements) to [0, -1]: the other sizes hold no element", id="infer-next-to-zero"),
    pytest.param((3, 4), (-1, -1), "shape [-1, -1] has more than one -1", id="two-minus-one"),
    pytest.param((3, 4), (-2, -6), "shape [-2, -6] has a negative size", id="negative"),
]


@pytest.mark.parametrize(("shape", "new", "message"), RESHAPE_ERRORS)
def test_reshape_errors(shape: tuple[int, ...], new: tuple[int, ...], message: str) -> None:
    assert raises(ops.reshape_shape, shape, new) == message


# --------------------------------------------------------------------------- slice

SLICES = [
    pytest.param((10, 4), 0, [0, 5, 9], None, None, None, id="index"),
    pytest.param((10, 4), 0, [9, 0, 5], None, None, None, id="index-order-kept"),
    pytest.param((10, 4), 0, [-1, 0, -10], None, None, None, id="index-negative"),
    pytest.param((10, 4), 0, [3, 3], None, None, None, id="index-repeated"),
    pytest.param((10, 4), 1, [3, 1], None, None, None, id="index-dim1"),
    pytest.param((2, 10, 4), -2, [7, 2], None, None, None, id="index-negative-dim"),
    pytest.param((10, 4), 0, None, 2, 8, 2, id="start-stop-step"),
    pytest.param((10, 4), 0, None, None, 3, None, id="stop"),
    pytest.param((10, 4), 0, None, -3, None, None, id="start-negative"),
    pytest.param((10, 4), 0, None, None, None, -1, id="reverse"),
    pytest.param((10, 4), 1, None, 1, None, 2, id="step-dim1"),
    pytest.param((10, 4), 0, None, 5, 100, None, id="stop-past-end"),
]


@pytest.mark.parametrize(("shape", "dim", "index", "start", "stop", "step"), SLICES)
def test_slice(shape, dim, index, start, stop, step) -> None:
    t = rand(*shape)
    a = t.numpy()
    if index is not None:
        ref = np.take(a, index, axis=dim)
    else:
        ref = a[(slice(None),) * (dim % a.ndim) + (slice(start, stop, step),)]
    out = ops.slice_(t, dim, index, start, stop, step)
    same(out, ref)
    assert ops.slice_shape(shape, dim, index, start, stop, step) == tuple(out.shape)


SLICE_ERRORS = [
    pytest.param((10, 4), 0, [0, 10], None, None, None, "index 10 is out of range for dim 0 of size 10", id="index-high"),
    pytest.param((10, 4), 1, [-5], None, None, None, "index -5 is out of range for dim 1 of size 4", id="index-low"),
    pytest.param((10, 4), 0, None, None, None, 0, "slice step cannot be 0", id="step-zero"),
    pytest.param((10, 4), 0, None, 5, 2, None, "the slice selects nothing from dim 0 of size 10", id="empty"),
    pytest.param((10, 4), 2, [0], None, None, None, "dim 2 is out of range for a 2-d tensor", id="dim"),
]


@pytest.mark.parametrize(("shape", "dim", "index", "start", "stop", "step", "message"), SLICE_ERRORS)
def test_slice_errors(shape, dim, index, start, stop, step, message: str) -> None:
    assert raises(ops.slice_shape, shape, dim, index, start, stop, step) == message
    assert raises(ops.slice_, rand(*shape), dim, index, start, stop, step) == message


# --------------------------------------------------------------------------- pad


def padded_reference(t: torch.Tensor, target: tuple[int, ...], fill: float) -> torch.Tensor:
    out = torch.full(target, fill, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


PADS = [
    pytest.param((5, 4), (7, 4), "zeros", 0.0, id="zeros-rows"),
    pytest.param((5, 4), (5, 6), "zeros", 0.0, id="zeros-cols"),
    pytest.param((5, 4), (7, 6), "zeros", 0.0, id="zeros-both"),
    pytest.param((5,), (8,), 0.5, 0.5, id="number-bias"),
    pytest.param((5, 4), (9, 4), -1, -1.0, id="number-int"),
    pytest.param((2, 3, 4), (2, 5, 4), 3.25, 3.25, id="number-3d"),
]


@pytest.mark.parametrize(("shape", "target", "fill", "value"), PADS)
def test_pad_with_a_value(shape, target, fill, value) -> None:
    t = rand(*shape)
    out = ops.pad(t, target, fill)
    same(out, padded_reference(t, target, value))
    assert ops.pad_shape(shape, target) == tuple(out.shape)


def test_pad_mean_rows_are_the_mean_of_the_old_rows() -> None:
    """Token embeddings [vocab, dim] grown by 3 rows: each new row is the mean embedding."""
    t = rand(10, 8)
    out = ops.pad(t, (13, 8), "mean")
    assert out.shape == (13, 8)
    assert torch.equal(out[:10], t)
    mean = t.sum(0) / t.shape[0]
    for row in out[10:]:
        torch.testing.assert_close(row, mean, rtol=0, atol=1e-6)


def test_pad_mean_along_two_dims_in_order() -> None:
    """Rows first (each new row the mean row), then columns (each new entry its row's mean)."""
    t = rand(4, 3)
    out = ops.pad(t, (6, 5), "mean")
    rows = torch.cat([t, t.mean(0, keepdim=True).expand(2, 3)], 0)
    ref = torch.cat([rows, rows.mean(1, keepdim=True).expand(6, 2)], 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(out[:4, :3], t)


def test_pad_mean_matches_hf_mean_resizing() -> None:
    """``resize_token_embeddings(n, mean_resizing=True)`` starts new rows at the mean of the
    old ones (sampled with a 1e-9-scaled covariance when that is positive definite)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(13, mean_resizing=True)
    hf = model.get_input_embeddings().weight.detach()
    ours = ops.pad(old, (13, 16), "mean")
    assert torch.equal(ours[:10], hf[:10])
    torch.testing.assert_close(ours[10:], hf[10:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fill", ["zeros", "mean", 0.5])
def test_pad_keeps_the_dtype(dtype: torch.dtype, fill) -> None:
    t = rand(5, 4, dtype=dtype)
    out = ops.pad(t, (7, 4), fill)
    assert out.dtype == dtype
    assert torch.equal(out[:5], t)
    extra = t.float().mean(0).to(dtype) if fill == "mean" else torch.full((4,), 0.0 if fill == "zeros" else fill, dtype=dtype)
    assert torch.equal(out[5:], extra.expand(2, 4))


def test_pad_to_the_same_shape_changes_nothing() -> None:
    t = rand(5, 4)
    assert ops.pad_shape((5, 4), (5, 4)) == (5, 4)
    same(ops.pad(t, (5, 4), "mean"), t)


PAD_ERRORS = [
    pytest.param((5, 4), (3, 4), "cannot pad [5, 4] to [3, 4]: dim 0 would shrink (use slice)", id="shrink"),
    pytest.param((5, 4), (6, 2), "cannot pad [5, 4] to [6, 2]: dim 1 would shrink (use slice)", id="shrink-one-dim"),
    pytest.param((5, 4), (5, 4, 1), "cannot pad [5, 4] to [5, 4, 1]: different number of dims", id="rank"),
]


@pytest.mark.parametrize(("shape", "target", "message"), PAD_ERRORS)
def test_pad_errors(shape, target, message: str) -> None:
    assert raises(ops.pad_shape, shape, target) == message


# --------------------------------------------------------------------------- concat / stack

CONCATS = [
    pytest.param([(2, 4), (3, 4), (1, 4)], 0, False, id="cat-rows"),
    pytest.param([(4, 2), (4, 3)], 1, False, id="cat-cols"),
    pytest.param([(2, 3, 4), (2, 3, 1)], -1, False, id="cat-last"),
    pytest.param([(4, 5)] * 3, 0, True, id="stack-0"),
    pytest.param([(4, 5)] * 3, 1, True, id="stack-1"),
    pytest.param([(4, 5)] * 2, -1, True, id="stack-new-last"),
]


@pytest.mark.parametrize(("shapes", "dim", "stack"), CONCATS)
def test_concat(shapes, dim: int, stack: bool) -> None:
    parts = [rand(*s, seed=n) for n, s in enumerate(shapes)]
    arrays = [p.numpy() for p in parts]
    ref = np.stack(arrays, axis=dim) if stack else np.concatenate(arrays, axis=dim)
    out = ops.concat(parts, dim, stack)
    same(out, ref)
    assert ops.concat_shape(shapes, dim, stack) == tuple(out.shape)


CONCAT_ERRORS = [
    pytest.param([(2, 4), (3, 5)], 0, False, "cannot concatenate along dim 0: the other dims differ: [[2, 4], [3, 5]]", id="other-dims"),
    pytest.param([(2, 4), (4,)], 0, False, "cannot concatenate parts with different numbers of dims: [[2, 4], [4]]", id="rank"),
    pytest.param([(2, 4), (2, 4)], 2, False, "dim 2 is out of range for a 2-d tensor", id="dim"),
    pytest.param([(2, 4), (3, 4)], 0, True, "cannot stack parts of different shapes: [[2, 4], [3, 4]]", id="stack-shapes"),
    pytest.param([(2, 4), (2, 4)], 3, True, "dim 3 is out of range for a 3-d tensor", id="stack-dim"),
]


@pytest.mark.parametrize(("shapes", "dim", "stack", "message"), CONCAT_ERRORS)
def test_concat_errors(shapes, dim: int, stack: bool, message: str) -> None:
    assert raises(ops.concat_shape, shapes, dim, stack) == message


# --------------------------------------------------------------------------- split

SPLITS = [
    pytest.param((12, 4), 0, 3, None, id="equal-rows"),
    pytest.param((4, 12), 1, 2, None, id="equal-cols"),
    pytest.param((2, 4, 6), -1, 3, None, id="equal-last"),
    pytest.param((12, 4), 0, 3, (2, 6, 4), id="sizes"),
    pytest.param((3, 10), -1, 2, (9, 1), id="sizes-last"),
]


@pytest.mark.parametrize(("shape", "dim", "parts", "sizes"), SPLITS)
def test_split(shape, dim: int, parts: int, sizes) -> None:
    t = rand(*shape)
    a = t.numpy()
    ref = np.split(a, np.cumsum(sizes)[:-1], axis=dim) if sizes else np.split(a, parts, axis=dim)
    planned = ops.split_shapes(shape, dim, parts, sizes)
    assert len(planned) == len(ref) == parts
    for part, r in enumerate(ref):
        out = ops.split(t, dim, parts, sizes, part)
        same(out, r)
        assert planned[part] == tuple(out.shape)
    rebuilt = ops.concat([ops.split(t, dim, parts, sizes, p) for p in range(parts)], dim, False)
    same(rebuilt, t)


SPLIT_ERRORS = [
    pytest.param((10, 4), 0, 3, None, "dim 0 of [10, 4] has size 10, which does not divide into 3 equal parts", id="not-dividing"),
    pytest.param((4, 10), -1, 4, None, "dim -1 of [4, 10] has size 10, which does not divide into 4 equal parts", id="not-dividing-last"),
    pytest.param((12, 4), 0, 3, (4, 4, 3), "sizes [4, 4, 3] add up to 11, but dim 0 of [12, 4] is 12", id="sizes-sum"),
    pytest.param((12, 4), 2, 3, None, "dim 2 is out of range for a 2-d tensor", id="dim"),
]


@pytest.mark.parametrize(("shape", "dim", "parts", "sizes", "message"), SPLIT_ERRORS)
def test_split_errors(shape, dim: int, parts: int, sizes, message: str) -> None:
    assert raises(ops.split_shapes, shape, dim, parts, sizes) == message


# --------------------------------------------------------------------------- in_channels


def timm_adapt():
    pytest.importorskip("timm")
    from timm.models._manipulate import adapt_input_conv

    return adapt_input_conv


@pytest.mark.parametrize("in_chans", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_in_channels_matches_timm(in_chans: int, dtype: torch.dtype) -> None:
    w = rand(8, 3, 3, 3, dtype=dtype)
    ref = timm_adapt()(in_chans, w.clone())
    out = ops.adapt_in_channels(w, in_chans)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    assert ops.in_channels_shape(tuple(w.shape), (8, in_chans, 3, 3)) == tuple(out.shape)


def test_in_channels_space_to_depth_matches_timm() -> None:
    """A space-to-depth stem [O, 3*k, ...] to 1-channel images: timm sums each RGB triple,
    giving [O, k, ...] (the target's weight shape)."""
    w = rand(8, 12, 3, 3)
    ref = timm_adapt()(1, w.clone())
    assert ref.shape == (8, 4, 3, 3)
    out = ops.adapt_in_channels(w, 4)
    assert torch.equal(out, ref)
    assert ops.in_channels_shape((8, 12, 3, 3), (8, 4, 3, 3)) == (8, 4, 3, 3)


@pytest.mark.parametrize("have", [2, 4, 12])
def test_in_channels_any_filters_to_one_are_summed(have: int) -> None:
    w = rand(8, have, 3, 3)
    out = ops.adapt_in_channels(w, 1)
    torch.testing.assert_close(out, w.sum(1, keepdim=True), rtol=0, atol=1e-6)
    assert ops.in_channels_shape(tuple(w.shape), (8, 1, 3, 3)) == (8, 1, 3, 3)


def test_in_channels_gray_conv_equals_rgb_conv_on_repeated_input() -> None:
    w, b = rand(8, 3, 3, 3), rand(8, seed=1)
    x = rand(2, 1, 9, 9, seed=2)
    gray = F.conv2d(x, ops.adapt_in_channels(w, 1), b, padding=1)
    rgb = F.conv2d(x.repeat(1, 3, 1, 1), w, b, padding=1)
    torch.testing.assert_close(gray, rgb, rtol=1e-5, atol=1e-5)


def test_in_channels_six_channel_conv_equals_rgb_conv_on_two_copies() -> None:
    """Repeated and scaled by 3/6: two stacked copies of an RGB image give the RGB output."""
    w, b = rand(8, 3, 3, 3), rand(8, seed=1)
    x = rand(2, 3, 9, 9, seed=2)
    six = F.conv2d(torch.cat([x, x], 1), ops.adapt_in_channels(w, 6), b, padding=1)
    torch.testing.assert_close(six, F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)


def test_in_channels_conv1d_weights() -> None:
    w = rand(8, 3, 5)
    torch.testing.assert_close(ops.adapt_in_channels(w, 1), w.sum(1, keepdim=True), rtol=0, atol=1e-6)
    assert torch.equal(ops.adapt_in_channels(w, 4), torch.cat([w, w[:, :1]], 1) * 0.75)


def test_in_channels_unchanged_is_the_same_tensor() -> None:
    w = rand(8, 3, 3, 3)
    assert ops.adapt_in_channels(w, 3) is w


IN_CHANNELS_ERRORS = [
    pytest.param(
        (8, 4, 3, 3), (8, 2, 3, 3),
        "in_channels cannot fit 4 input channels to 2: it sums any filters to 1 channel, repeats 3-channel (RGB) filters "
        "to any number, or sums the RGB triples of 3*k channels to k; [8, 4, 3, 3] cannot become [8, 2, 3, 3]",
        id="4-to-2",
    ),
    pytest.param(
        (8, 12, 3, 3), (8, 6, 3, 3),
        "in_channels cannot fit 12 input channels to 6: it sums any filters to 1 channel, repeats 3-channel (RGB) filters "
        "to any number, or sums the RGB triples of 3*k channels to k; [8, 12, 3, 3] cannot become [8, 6, 3, 3]",
        id="12-to-6",
    ),
    pytest.param((8, 3), (8, 1), "in_channels needs conv weights [out, in, ...] of equal rank; found [8, 3] and target [8, 1]", id="linear"),
    pytest.param((8, 3, 3, 3), (8, 1, 3), "in_channels needs conv weights [out, in, ...] of equal rank; found [8, 3, 3, 3] and target [8, 1, 3]", id="rank"),
    pytest.param((8, 3, 3, 3), (4, 1, 3, 3), "in_channels changes only dim 1: [8, 3, 3, 3] cannot become [4, 1, 3, 3]", id="out-channels"),
    pytest.param((8, 3, 3, 3), (8, 1, 5, 5), "in_channels changes only dim 1: [8, 3, 3, 3] cannot become [8, 1, 5, 5]", id="kernel"),
]


@pytest.mark.parametrize(("shape", "target", "message"), IN_CHANNELS_ERRORS)
def test_in_channels_errors(shape, target, message: str) -> None:
    assert raises(ops.in_channels_shape, shape, target) == message


def test_in_channels_tensor_function_refuses_what_the_shape_function_refuses() -> None:
    assert raises(ops.adapt_in_channels, rand(8, 4, 3, 3), 2) == IN_CHANNELS_ERRORS[0].values[2]


# --------------------------------------------------------------------------- interpolate


def grid_reference(t: torch.Tensor, prefix: int, new_side: int, mode: str) -> torch.Tensor:
    """The grid after the prefix tokens, as an image [1, C, H, W], resized by F.interpolate."""
    x = t if t.dim() == 3 else t[None]
    side = math.isqrt(x.shape[1] - prefix)
    grid = x[:, prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(new_side, new_side), mode=mode, antialias=mode != "nearest")
    body = resized.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(t.dtype)
    out = torch.cat([x[:, :prefix], body], 1)
    return out if t.dim() == 3 else out[0]


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize(("side", "new_side"), [(4, 6), (6, 4)], ids=["up", "down"])
def test_interpolate_2d_matches_f_interpolate(prefix: int, mode: str, side: int, new_side: int) -> None:
    t = rand(1, prefix + side * side, 8)
    target = (1, prefix + new_side * new_side, 8)
    out = ops.interpolate_grid(t, target[1], prefix, mode, "2d")
    same(out, grid_reference(t, prefix, new_side, mode))
    assert torch.equal(out[:, :prefix], t[:, :prefix])  # the class/register tokens are kept aside
    assert ops.interpolate_shape(tuple(t.shape), target, prefix) == tuple(out.shape)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(("mode", "antialias"), [("bicubic", True), ("bilinear", True), ("nearest", False)])
def test_interpolate_2d_matches_timm_resample_abs_pos_embed(prefix: int, mode: str, antialias: bool) -> None:
    pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    t = rand(1, prefix + 14 * 14, 16)
    ref = resample_abs_pos_embed(t, new_size=[24, 24], num_prefix_tokens=prefix, interpolation=mode, antialias=antialias)
    out = ops.interpolate_grid(t, prefix + 24 * 24, prefix, mode, "2d")
    same(out, ref)


def test_interpolate_2d_without_batch_dim() -> None:
    t = rand(1 + 16, 8)
    out = ops.interpolate_grid(t, 1 + 9, 1, "bicubic", "2d")
    same(out, grid_reference(t, 1, 3, "bicubic"))
    assert ops.interpolate_shape((17, 8), (10, 8), 1) == (10, 8)


def test_interpolate_2d_batch_of_grids() -> None:
    t = rand(2, 1 + 16, 8)
    out = ops.interpolate_grid(t, 1 + 36, 1, "bicubic", "2d")
    assert out.shape == (2, 37, 8)
    for b in range(2):
        same(out[b : b + 1].contiguous(), grid_reference(t[b : b + 1], 1, 6, "bicubic"))


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("new_n", [17, 6])
def test_interpolate_1d_matches_f_interpolate_on_the_sequence(prefix: int, mode: str, new_n: int) -> None:
    t = rand(1, prefix + 10, 8)
    ref_body = F.interpolate(t[:, prefix:].transpose(1, 2), size=new_n, mode=mode).transpose(1, 2)
    out = ops.interpolate_grid(t, prefix + new_n, prefix, mode, "1d")
    same(out, torch.cat([t[:, :prefix], ref_body], 1))
    assert ops.interpolate_shape(tuple(t.shape), (1, prefix + new_n, 8), prefix, "1d") == tuple(out.shape)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("new_n", [17, 6])
def test_interpolate_1d_bicubic_is_a_1_by_l_grid(mode: str, new_n: int) -> None:
    """bicubic (the default) and bilinear resize a sequence as a 1 x L image, antialiased
    as the 2-d grid is; the single row is left as it is."""
    t = rand(1, 1 + 10, 8)
    image = t[:, 1:].transpose(1, 2).reshape(1, 8, 1, 10)
    ref_body = F.interpolate(image, size=(1, new_n), mode=mode, antialias=True).reshape(1, 8, new_n).transpose(1, 2)
    out = ops.interpolate_grid(t, 1 + new_n, 1, mode, "1d")
    same(out, torch.cat([t[:, :1], ref_body], 1))


def test_interpolate_1d_bilinear_upsampling_is_linear() -> None:
    t = rand(1, 10, 8)
    linear = ops.interpolate_grid(t, 17, 0, "linear", "1d")
    torch.testing.assert_close(ops.interpolate_grid(t, 17, 0, "bilinear", "1d"), linear, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grid", ["2d", "1d"])
def test_interpolate_keeps_the_dtype(dtype: torch.dtype, grid: str) -> None:
    t = rand(1, 1 + 16, 8, dtype=dtype)
    out = ops.interpolate_grid(t, 1 + 36, 1, "bicubic", grid)
    assert out.dtype == dtype
    ref = ops.interpolate_grid(t.float(), 1 + 36, 1, "bicubic", grid).to(dtype)  # computed in float32
    assert torch.equal(out, ref)
    if grid == "2d":
        same(out, grid_reference(t, 1, 6, "bicubic"))


def test_interpolate_to_the_same_grid_is_identity() -> None:
    t = rand(1, 1 + 16, 8)
    torch.testing.assert_close(ops.interpolate_grid(t, 17, 1, "bicubic", "2d"), t, rtol=0, atol=1e-6)


INTERPOLATE_ERRORS = [
    pytest.param(
        (1, 1 + 15, 8), (1, 1 + 36, 8), 1, "2d",
        "[1, 16, 8] has 15 position tokens after 1 prefix token(s), which do not form a square grid (grid: 1d resizes a sequence)",
        id="source-not-square",
    ),
    pytest.param(
        (1, 2 + 16, 8), (1, 2 + 35, 8), 2, "2d",
        "[1, 37, 8] has 35 position tokens after 2 prefix token(s), which do not form a square grid (grid: 1d resizes a sequence)",
        id="target-not-square",
    ),
    pytest.param(
        (1, 17, 8), (1, 37, 16), 1, "2d", "interpolate changes only the token dim: [1, 17, 8] cannot become [1, 37, 16]", id="channels"
    ),
    pytest.param(
        (2, 17, 8), (1, 37, 8), 1, "2d", "interpolate changes only the token dim: [2, 17, 8] cannot become [1, 37, 8]", id="batch"
    ),
    pytest.param(
        (17,), (37,), 1, "2d", "interpolate needs [1, tokens, dim] or [tokens, dim]; found [17] and target [37]", id="rank-1"
    ),
    pytest.param(
        (1, 17, 8), (17, 8), 1, "2d", "interpolate needs [1, tokens, dim] or [tokens, dim]; found [1, 17, 8] and target [17, 8]", id="rank-differs"
    ),
    pytest.param((1, 1, 8), (1, 5, 8), 1, "2d", "[1, 1, 8] has no grid tokens after 1 prefix token(s)", id="only-prefix"),
    pytest.param((1, 10, 8), (1, 2, 8), 2, "1d", "[1, 2, 8] has no grid tokens after 2 prefix token(s)", id="target-only-prefix"),
]


@pytest.mark.parametrize(("shape", "target", "prefix", "grid", "message"), INTERPOLATE_ERRORS)
def test_interpolate_errors(shape, target, prefix: int, grid: str, message: str) -> None:
    assert raises(ops.interpolate_shape, shape, target, prefix, grid) == message


def test_interpolate_1d_grid_need_not_be_square() -> None:
    assert ops.interpolate_shape((1, 1 + 15, 8), (1, 1 + 35, 8), 1, "1d") == (1, 36, 8)


@pytest.mark.parametrize(
    ("mode", "grid", "message"),
    [
        ("linear", "2d", "mode 'linear' does not apply to a 2d grid; expected one of: bicubic, bilinear, nearest"),
        ("area", "1d", "mode 'area' does not apply to a 1d grid; expected one of: bicubic, bilinear, linear, nearest"),
    ],
)
def test_interpolate_mode_errors(mode: str, grid: str, message: str) -> None:
    assert raises(ops.interpolate_grid, rand(1, 17, 8), 37, 1, mode, grid) == message


# --------------------------------------------------------------------------- any device

ON_META = [
    pytest.param(ops.transpose, (2, 3, 4), dict(dims=(0, 2)), lambda s: ops.transpose_shape(s, (0, 2)), id="transpose"),
    pytest.param(ops.reshape, (3, 4), dict(new=(12,)), lambda s: ops.reshape_shape(s, (-1,)), id="reshape"),
    pytest.param(ops.slice_, (10, 4), dict(dim=0, index=[3, 1], start=None, stop=None, step=None), lambda s: ops.slice_shape(s, 0, [3, 1], None, None, None), id="slice"),
    pytest.param(ops.pad, (5, 4), dict(target=(7, 6), fill=0.5), lambda s: ops.pad_shape(s, (7, 6)), id="pad-number"),
    pytest.param(ops.pad, (5, 4), dict(target=(7, 4), fill="mean"), lambda s: ops.pad_shape(s, (7, 4)), id="pad-mean"),
    pytest.param(ops.split, (12, 4), dict(dim=0, parts=3, sizes=None, part=1), lambda s: ops.split_shapes(s, 0, 3, None)[1], id="split"),
    pytest.param(ops.adapt_in_channels, (8, 3, 3, 3), dict(in_chans=4), lambda s: ops.in_channels_shape(s, (8, 4, 3, 3)), id="in-channels"),
    pytest.param(ops.adapt_in_channels, (8, 12, 3, 3), dict(in_chans=4), lambda s: ops.in_channels_shape(s, (8, 4, 3, 3)), id="in-channels-s2d"),
    pytest.param(ops.interpolate_grid, (1, 10, 8), dict(target_tokens=17, prefix_tokens=0, mode="linear", grid="1d"), lambda s: (1, 17, 8), id="interpolate-1d"),
    pytest.param(ops.interpolate_grid, (1, 10, 8), dict(target_tokens=17, prefix_tokens=0, mode="bicubic", grid="1d"), lambda s: (1, 17, 8), id="interpolate-1d-bicubic"),
    pytest.param(ops.interpolate_grid, (1, 17, 8), dict(target_tokens=37, prefix_tokens=1, mode="bicubic", grid="2d"), lambda s: ops.interpolate_shape(s, (1, 37, 8), 1), id="interpolate-2d"),
]


@pytest.mark.parametrize(("fn", "shape", "kwargs", "planned"), ON_META)
def test_ops_run_on_the_device_of_their_input(fn, shape, kwargs, planned) -> None:
    """The engine may run a recipe on meta tensors (to check it before reading anything) or
    on another device: an op makes its new tensors where its input is."""
    t = torch.empty(shape, device="meta")
    out = fn(t, **kwargs)
    assert out.device.type == "meta"
    assert tuple(out.shape) == planned(shape)
    assert ops.concat([t, t], 0, False).device.type == "meta"
