"""Tensor operations of the rules language: each one a shape function and a tensor function.

The planner calls ``*_shape`` on shapes alone, so an impossible op is caught before any
tensor is read; the engine calls the tensor function at apply time. Both raise
:class:`OpError` with what was found and what was expected.

>>> transpose_shape((768, 2304), (0, 1))
(2304, 768)
>>> reshape_shape((768, 768), (768, 768, 1, 1))
(768, 768, 1, 1)
>>> split_shapes((2304, 768), 0, 3, None)
[(768, 768), (768, 768), (768, 768)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "CastOverflow",
    "cast",
    "OpError",
    "SizeValueError",
    "MAX_SIZE",
    "checked",
    "transpose_shape",
    "transpose",
    "reshape_shape",
    "reshape",
    "slice_shape",
    "slice_",
    "pad_shape",
    "check_fill",
    "pad",
    "concat_shape",
    "concat",
    "split_shapes",
    "split",
    "in_channels_shape",
    "adapt_in_channels",
    "interpolate_shape",
    "interpolate_grid",
    "HEAD_LAYOUTS",
    "other_layout",
    "permute_heads_shape",
    "permute_heads",
]

Shape = tuple[int, ...]


class OpError(ValueError):
    """An op cannot apply to a shape; the planner adds the step and the key."""


class SizeValueError(OpError):
    """A size expression of the rules cannot be computed for a key (a division with a
    remainder, a dim the tensor lacks): the failure names the step's place in the rules file."""


MAX_SIZE = 2**63 - 1  # torch holds sizes and element counts in int64


def checked(shape: Shape) -> Shape:
    """``shape`` when a tensor can have it: each size, and the number of elements, at most
    :data:`MAX_SIZE`; an op whose result could not exist fails at plan time.

    >>> checked((2**62, 4))
    Traceback (most recent call last):
    ...
    remap.rules.ops.OpError: shape [4611686018427387904, 4] has 18446744073709551616 elements; a tensor holds at most 2**63 - 1
    """
    big = next((d for d in shape if d > MAX_SIZE), None)
    if big is not None:
        raise OpError(f"shape {list(shape)} has a size of {big}; a tensor dim holds at most 2**63 - 1")
    numel = math.prod(shape)
    if numel > MAX_SIZE:
        raise OpError(f"shape {list(shape)} has {numel} elements; a tensor holds at most 2**63 - 1")
    return shape


def _dim(dim: int, ndim: int, what: str = "dim") -> int:
    if not -ndim <= dim < ndim:
        raise OpError(f"{what} {dim} is out of range for a {ndim}-d tensor")
    return dim % ndim


# --------------------------------------------------------------------------- transpose


def transpose_shape(shape: Shape, dims: Sequence[int]) -> Shape:
    """Swap two dims, or permute all of them when ``dims`` names every dim."""
    ndim = len(shape)
    if ndim < 2 and len(dims) == 2:
        raise OpError(f"cannot transpose a {ndim}-d tensor of shape {list(shape)}")
    if len(dims) == 2:
        a, b = (_dim(d, ndim) for d in dims)
        if a == b:
            raise OpError(f"dims {list(dims)} name the same dim of shape {list(shape)} twice: nothing to swap")
        out = list(shape)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    perm = [_dim(d, ndim) for d in dims]
    if sorted(perm) != list(range(ndim)):
        raise OpError(f"permutation {list(dims)} does not name each of the {ndim} dims of shape {list(shape)} once")
    return tuple(shape[d] for d in perm)


def transpose(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    if len(dims) == 2:
        return t.transpose(dims[0], dims[1]).contiguous()
    return t.permute(*dims).contiguous()


# --------------------------------------------------------------------------- reshape


def reshape_shape(shape: Shape, new: Sequence[int]) -> Shape:
    """``new`` may hold one -1, inferred from the element count."""
    numel = math.prod(shape)
    if sum(1 for d in new if d == -1) > 1:
        raise OpError(f"shape {list(new)} has more than one -1")
    if any(d < -1 for d in new):
        raise OpError(f"shape {list(new)} has a negative size")
    known = math.prod(d for d in new if d != -1)
    if -1 in new:
        if known == 0 or numel % known:
            why = "the other sizes hold no element" if known == 0 else f"{numel} is not a multiple of {known}"
            raise OpError(f"cannot reshape {list(shape)} ({numel} elements) to {list(new)}: {why}")
        new = [numel // known if d == -1 else d for d in new]
    elif known != numel:
        raise OpError(f"cannot reshape {list(shape)} ({numel} elements) to {list(new)} ({known} elements)")
    return checked(tuple(new))


def reshape(t: torch.Tensor, new: Sequence[int]) -> torch.Tensor:
    return t.reshape(tuple(new))  # a tuple: reshape(*()) would mean "no shape given"


# --------------------------------------------------------------------------- slice


def _positions(size: int, start: int | None, stop: int | None, step: int | None) -> range:
    """The positions a ``start:stop:step`` slice keeps of a dim of ``size``, as a range:
    nothing is listed, so a dim of 2**40 costs what a dim of 10 does."""
    if step == 0:
        raise OpError("slice step cannot be 0")
    return range(*slice(start, stop, step).indices(size))


def _count(r: range) -> int:
    """``len(r)`` for any range (``len`` overflows past ``sys.maxsize``)."""
    return max(0, (r.stop - r.start + r.step - (1 if r.step > 0 else -1)) // r.step)


def _check_index(size: int, index: Sequence[int], dim: int) -> None:
    bad = next((i for i in index if not -size <= i < size), None)
    if bad is not None:
        raise OpError(f"index {bad} is out of range for dim {dim} of size {size}")


def slice_shape(shape: Shape, dim: int, index: Sequence[int] | None, start: int | None, stop: int | None, step: int | None) -> Shape:
    """The shape after keeping ``index`` (a list) or ``start:stop:step`` of dim ``dim``;
    computed by arithmetic, whatever the size of the dim."""
    d = _dim(dim, len(shape))
    if index is not None:
        _check_index(shape[d], index, dim)
        n = len(index)
    else:
        n = _count(_positions(shape[d], start, stop, step))
    if n == 0:
        raise OpError(f"the slice selects nothing from dim {dim} of size {shape[d]}")
    return (*shape[:d], n, *shape[d + 1 :])


def slice_(t: torch.Tensor, dim: int, index: Sequence[int] | None, start: int | None, stop: int | None, step: int | None) -> torch.Tensor:
    """Keep ``index`` (gathered) or ``start:stop:step`` (a view, flipped for a negative
    step) of dim ``dim``: a range builds no index tensor, however long the dim."""
    import torch

    slice_shape(tuple(t.shape), dim, index, start, stop, step)
    d = _dim(dim, t.dim())
    if index is not None:
        idx = torch.tensor([i % t.shape[d] for i in index], dtype=torch.long, device=t.device)
        return t.index_select(d, idx).contiguous()
    r = _positions(t.shape[d], start, stop, step)
    forward = r if r.step > 0 else r[::-1]
    out = t[(slice(None),) * d + (slice(forward.start, forward.stop, forward.step),)]
    return (out if r.step > 0 else out.flip(d)).contiguous()


# --------------------------------------------------------------------------- pad


def pad_shape(shape: Shape, target: Shape) -> Shape:
    """Pad at the end of each dim up to ``target``; no dim may shrink."""
    if len(shape) != len(target):
        raise OpError(f"cannot pad {list(shape)} to {list(target)}: different number of dims")
    shrink = [i for i, (a, b) in enumerate(zip(shape, target)) if a > b]
    if shrink:
        raise OpError(f"cannot pad {list(shape)} to {list(target)}: dim {shrink[0]} would shrink (use slice)")
    return checked(tuple(target))


FLOAT_MAX = {"float64": 1.7976931348623157e308, "complex128": 1.7976931348623157e308, "float32": 3.4028234663852886e38,
             "complex64": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38, "float16": 65504.0,
             "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}  # fmt: skip
INT_RANGE = {"bool": (0, 1), "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
             "int8": (-(2**7), 2**7 - 1), "int16": (-(2**15), 2**15 - 1), "int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}  # fmt: skip


def check_fill(fill: float, dtype: str) -> None:
    """A number ``pad`` may fill a ``dtype`` tensor with: an integer in range for an integer
    dtype (0 or 1 for bool); for a floating dtype, NaN, an infinity, or a number within its
    largest finite value. Checked at plan time: torch refuses the rest only when applying.

    >>> check_fill(300, "int8")
    Traceback (most recent call last):
    ...
    remap.rules.ops.OpError: cannot pad with fill 300: int8 holds integers from -128 to 127
    """
    if dtype in INT_RANGE:
        low, high = INT_RANGE[dtype]
        if isinstance(fill, float) and not fill.is_integer():
            raise OpError(f"cannot pad with fill {fill}: the tensor is {dtype}, which holds integers only")
        if not low <= fill <= high:
            raise OpError(f"cannot pad with fill {fill}: {dtype} holds integers from {low} to {high}")
    elif dtype in FLOAT_MAX and math.isfinite(fill) and abs(fill) > FLOAT_MAX[dtype]:
        raise OpError(f"cannot pad with fill {fill}: the largest finite {dtype} is {FLOAT_MAX[dtype]:g}")


def pad(t: torch.Tensor, target: Shape, fill: str | float) -> torch.Tensor:
    """Grow ``t`` to ``target``; new entries are ``fill`` (a number), ``zeros``, or ``mean``:
    the mean of the existing entries along each padded dim (new rows of a token embedding
    start at the mean embedding, as ``resize_token_embeddings`` does)."""
    import torch

    out = t
    for d, (have, want) in enumerate(zip(t.shape, target)):
        if have == want:
            continue
        shape = list(out.shape)
        shape[d] = want - have
        if fill == "mean":
            extra = out.float().mean(dim=d, keepdim=True).to(out.dtype).expand(*shape)
        else:
            extra = torch.full(shape, 0 if fill == "zeros" else fill, dtype=out.dtype, device=out.device)  # an int stays exact
        out = torch.cat([out, extra], dim=d)
    return out.contiguous()


# --------------------------------------------------------------------------- merge / split


def concat_shape(shapes: Sequence[Shape], dim: int, stack: bool) -> Shape:
    first = shapes[0]
    if stack:
        if any(s != first for s in shapes):
            raise OpError(f"cannot stack parts of different shapes: {[list(s) for s in shapes]}")
        d = _dim(dim, len(first) + 1)
        return checked((*first[:d], len(shapes), *first[d:]))
    if any(len(s) != len(first) for s in shapes):
        raise OpError(f"cannot concatenate parts with different numbers of dims: {[list(s) for s in shapes]}")
    d = _dim(dim, len(first))
    if any(s[:d] + s[d + 1 :] != first[:d] + first[d + 1 :] for s in shapes):
        raise OpError(f"cannot concatenate along dim {dim}: the other dims differ: {[list(s) for s in shapes]}")
    return checked((*first[:d], sum(s[d] for s in shapes), *first[d + 1 :]))


def concat(tensors: Sequence[torch.Tensor], dim: int, stack: bool) -> torch.Tensor:
    import torch

    return torch.stack(list(tensors), dim=dim) if stack else torch.cat(list(tensors), dim=dim)


def split_shapes(shape: Shape, dim: int, parts: int, sizes: Sequence[int] | None) -> list[Shape]:
    d = _dim(dim, len(shape))
    if sizes is not None:
        if sum(sizes) != shape[d]:
            raise OpError(f"sizes {list(sizes)} add up to {sum(sizes)}, but dim {dim} of {list(shape)} is {shape[d]}")
        return [(*shape[:d], s, *shape[d + 1 :]) for s in sizes]
    if shape[d] % parts:
        raise OpError(f"dim {dim} of {list(shape)} has size {shape[d]}, which does not divide into {parts} equal parts")
    return [(*shape[:d], shape[d] // parts, *shape[d + 1 :])] * parts


def split(t: torch.Tensor, dim: int, parts: int, sizes: Sequence[int] | None, part: int) -> torch.Tensor:
    if sizes is not None:
        return t.split(list(sizes), dim=dim)[part].contiguous()
    return t.chunk(parts, dim=dim)[part].contiguous()


# --------------------------------------------------------------------------- adapters


def in_channels_shape(shape: Shape, target: Shape) -> Shape:
    """A conv weight [O, I, ...] fitted to the target's input channels: any filters to 1
    channel (summed); 3-channel (RGB) filters to N (repeated); a space-to-depth stem of
    3*k channels to k (each RGB triple summed)."""
    if len(shape) < 3 or len(target) != len(shape):
        raise OpError(f"in_channels needs conv weights [out, in, ...] of equal rank; found {list(shape)} and target {list(target)}")
    if shape[0] != target[0] or shape[2:] != target[2:]:
        raise OpError(f"in_channels changes only dim 1: {list(shape)} cannot become {list(target)}")
    have, want = shape[1], target[1]
    if not (want in (have, 1) or have == 3 or (have % 3 == 0 and want == have // 3)):
        raise OpError(
            f"in_channels cannot fit {have} input channels to {want}: it sums any filters to 1 channel, "
            f"repeats 3-channel (RGB) filters to any number, or sums the RGB triples of 3*k channels to k; "
            f"{list(shape)} cannot become {list(target)}"
        )
    return tuple(target)


def adapt_in_channels(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Fit stem filters ``w`` [O, I, ...] to ``in_chans`` inputs, as timm's ``adapt_input_conv``:

    - 1 channel: the filters of all I channels summed, so that the model on a 1-channel
      image gives what the source model gives on that image repeated to I channels;
    - RGB (I = 3) to N channels: the filters repeated (R, G, B, R, ...) and scaled by 3/N so
      that activations keep their magnitude;
    - a space-to-depth stem of 3*k channels to k: each RGB triple summed (what timm does
      for such a stem with ``in_chans=1``).
    """
    dtype = w.dtype
    have = w.shape[1]
    if in_chans == have:
        return w
    in_channels_shape(tuple(w.shape), (w.shape[0], in_chans, *w.shape[2:]))
    w = w.float()  # half-precision sums on the CPU
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    elif have == 3:
        repeat = math.ceil(in_chans / 3)
        w = w.repeat(1, repeat, *([1] * (w.dim() - 2)))[:, :in_chans] * (3 / in_chans)
    else:  # space-to-depth: [O, k*3, ...] -> [O, k, ...]
        w = w.reshape(w.shape[0], in_chans, 3, *w.shape[2:]).sum(dim=2)
    return w.to(dtype).contiguous()


INTERPOLATE_MODES = {"2d": ("bicubic", "bilinear", "nearest"), "1d": ("bicubic", "bilinear", "linear", "nearest")}


def _grid(n: int, shape: Shape | None = None, prefix_tokens: int = 0) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        of = f"{list(shape)} has {n} position tokens after {prefix_tokens} prefix token(s), which " if shape is not None else f"{n} position tokens "
        raise OpError(f"{of}do not form a square grid (grid: 1d resizes a sequence)")
    return side, side


def interpolate_shape(shape: Shape, target: Shape, prefix_tokens: int, grid: str = "2d") -> Shape:
    """Position embeddings [B, prefix + H*W, C] or [prefix + H*W, C] (``grid="1d"``:
    prefix + L) to the target's token count; a 2-d grid must be square."""
    if len(shape) not in (2, 3) or len(target) != len(shape):
        raise OpError(f"interpolate needs [1, tokens, dim] or [tokens, dim]; found {list(shape)} and target {list(target)}")
    if shape[-1] != target[-1] or shape[:-2] != target[:-2]:
        raise OpError(f"interpolate changes only the token dim: {list(shape)} cannot become {list(target)}")
    for s in (shape, target):
        if s[-2] <= prefix_tokens:
            raise OpError(f"{list(s)} has no grid tokens after {prefix_tokens} prefix token(s)")
    if grid == "2d":
        for s in (shape, target):
            _grid(s[-2] - prefix_tokens, s, prefix_tokens)
    return checked(tuple(target))


def interpolate_grid(t: torch.Tensor, target_tokens: int, prefix_tokens: int, mode: str, grid: str) -> torch.Tensor:
    """Resize a 1-D or 2-D (square) grid of position embeddings, prefix tokens kept aside.

    2-d: the tokens after the prefix are reshaped to [B, C, H, W] and resized with
    ``F.interpolate`` (antialiased for bicubic and bilinear, as timm's
    ``resample_abs_pos_embed``), in float32. 1-d: ``linear`` and ``nearest`` resize the
    sequence [B, C, L] directly; ``bicubic`` and ``bilinear`` resize it as a 1 x L grid.
    """
    import torch
    import torch.nn.functional as F

    if mode not in INTERPOLATE_MODES.get(grid, ()):
        raise OpError(f"mode {mode!r} does not apply to a {grid} grid; expected one of: {', '.join(INTERPOLATE_MODES.get(grid, ()))}")
    squeeze = t.dim() == 2
    x = t.unsqueeze(0) if squeeze else t
    prefix, body = x[:, :prefix_tokens], x[:, prefix_tokens:]
    dtype, (b, n, dim) = body.dtype, body.shape
    new_n = target_tokens - prefix_tokens
    body = body.float().transpose(1, 2)  # [B, C, N]
    antialias = mode in ("bicubic", "bilinear")
    if grid == "1d" and not antialias:
        body = F.interpolate(body, size=new_n, mode=mode)
    else:
        (h, w), (nh, nw) = ((1, n), (1, new_n)) if grid == "1d" else (_grid(n), _grid(new_n))
        body = F.interpolate(body.reshape(b, dim, h, w), size=(nh, nw), mode=mode, antialias=antialias)
        body = body.reshape(b, dim, nh * nw)
    out = torch.cat([prefix, body.transpose(1, 2).to(dtype)], dim=1)
    return (out.squeeze(0) if squeeze else out).contiguous()


# --------------------------------------------------------------------------- rotary heads

#: The row layouts of a rotary q/k projection: Meta's and GGUF's pairs on neighbouring rows,
#: Hugging Face's halves (each head's first rotary halves, then its second ones).
HEAD_LAYOUTS = ("half_split", "interleaved")


def other_layout(to: str) -> str:
    """The layout a ``permute_heads`` to ``to`` came from (its inverse goes there).

    >>> other_layout("half_split")
    'interleaved'
    """
    return HEAD_LAYOUTS[1 - HEAD_LAYOUTS.index(to)]


def permute_heads_shape(shape: Shape, heads: int, dim: int = 0) -> Shape:
    """The shape (unchanged) when dim ``dim`` of ``shape`` splits into ``heads`` heads of an
    even head_dim; else OpError with the numbers.

    >>> permute_heads_shape((4096, 4096), 32)
    (4096, 4096)
    >>> permute_heads_shape((1024, 4096), 3)
    Traceback (most recent call last):
    ...
    remap.rules.ops.OpError: dim 0 has 1024 rows, which do not split into 3 heads (1024 / 3 leaves 1)
    """
    if not shape:
        raise OpError("permute_heads needs a tensor with rows, found a 0-d tensor")
    d = _dim(dim, len(shape))
    rows = shape[d]
    if heads < 1:
        raise OpError(f"permute_heads needs at least 1 head, found {heads}")
    if rows % heads:
        raise OpError(f"dim {dim} has {rows} rows, which do not split into {heads} heads ({rows} / {heads} leaves {rows % heads})")
    if (rows // heads) % 2:
        raise OpError(f"dim {dim} has {rows} rows: {heads} heads of {rows // heads} rows, an odd head_dim, "
                      "which has no rotary pairs to permute (is heads right?)")  # fmt: skip
    return shape


def permute_heads(t: torch.Tensor, heads: int, to: str, dim: int = 0) -> torch.Tensor:
    """The rows of every head of ``t`` (along ``dim``) from one rotary layout to the other.

    To ``half_split`` (Meta/GGUF -> Hugging Face): each head's rows ``[h, head_dim/2, 2]``
    read as ``[h, 2, head_dim/2]``, as transformers' ``convert_llama_weights_to_hf.permute``
    and its GGUF loader's reverse permutation do; to ``interleaved`` the opposite, as
    llama.cpp's ``convert_hf_to_gguf.py`` permutes. One undoes the other exactly.
    """
    permute_heads_shape(tuple(t.shape), heads, dim)
    d = dim % t.dim()
    x = t.movedim(d, 0) if d else t
    rows, rest = x.shape[0], tuple(x.shape[1:])
    if to not in HEAD_LAYOUTS:
        raise OpError(f"permute_heads: expected to: one of {', '.join(HEAD_LAYOUTS)}, found {to!r}")
    half = rows // heads // 2
    grouped = (heads, half, 2, *rest) if to == "half_split" else (heads, 2, half, *rest)
    y = x.reshape(grouped).transpose(1, 2).reshape(x.shape)
    return (y.movedim(0, d) if d else y).contiguous()


class CastOverflow(ValueError):
    """A ``cast`` step met a finite value its dtype cannot hold (it would become inf)."""


def cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` in ``dtype``; :class:`CastOverflow` when a narrowing float cast turns a finite value
    infinite (the loader names the key and puts the module back).

    >>> import torch
    >>> cast(torch.tensor([1.0, 2.0]), "float16").dtype
    torch.float16
    >>> cast(torch.tensor([1.0, 7e4]), "float16")
    Traceback (most recent call last):
    ...
    remap.rules.ops.CastOverflow: float32 -> float16 overflows: its largest value is 70000 (at index 1), and float16 holds at most 65504; 1 value(s) would become inf
    """
    import torch

    out = t.to(getattr(torch, dtype))
    if t.is_meta or not t.numel() or not (t.is_floating_point() and out.is_floating_point()):
        return out
    if torch.finfo(out.dtype).max >= torch.finfo(t.dtype).max:
        return out  # not narrowing the range
    bad = torch.isinf(out) & torch.isfinite(t)
    if bool(bad.any()):
        where = int(torch.nonzero(bad.reshape(-1))[0])
        src = str(t.dtype).removeprefix("torch.")
        raise CastOverflow(f"{src} -> {dtype} overflows: its largest value is {float(t[bad].abs().max()):g} (at index {where}), "
                           f"and {dtype} holds at most {torch.finfo(out.dtype).max:g}; {int(bad.sum())} value(s) would become inf")  # fmt: skip
    return out

