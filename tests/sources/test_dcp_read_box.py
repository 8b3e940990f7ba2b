"""``read_box`` of a torch.distributed.checkpoint folder (issue 19): the part of a tensor one rank
owns, read from only the saved chunks that overlap it. Folders are written by torch's own
``dcp.save`` (one process, and two gloo ranks saving DTensor Shard(0)/Shard(1) chunks); every
box is compared with the slice of the whole tensor that ``source.read`` gives, and the chunks
actually read are recorded where torch's ``FileSystemReader`` opens each stored item."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from remap.errors import SourceError
from remap.sources.combined import CombinedSource
from remap.sources.dcp_reader import METADATA, read_metadata
from remap.sources.readers import open_source

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.filesystem import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.metadata import MetadataIndex  # noqa: E402


def plain_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(9, 5, generator=g),
        "cube": torch.randn(3, 4, 5, generator=g).to(torch.bfloat16),
        "norm": torch.randn(6, generator=g).to(torch.float16),
        "mask": torch.rand(4, 3, generator=g) > 0.5,
        "steps": torch.tensor(17),
        "empty": torch.zeros(0, 3),
    }


def sharded_weights() -> dict[str, torch.Tensor]:
    """What :func:`save_sharded` saves, as whole tensors (the same seed on every rank)."""
    g = torch.Generator().manual_seed(1)
    return {
        "rows": torch.randn(7, 3, generator=g),  # Shard(0): rows 0..4 and 4..7
        "cols": torch.randn(6, 9, generator=g),  # Shard(1): columns 0..5 and 5..9
        "half": torch.randn(4, 6, generator=g).to(torch.bfloat16),  # Shard(1): columns 0..3 and 3..6
        "one": torch.randn(1, 5, generator=g),  # Shard(0) of one row: rank 1's chunk is empty
        "scale": torch.tensor(2.5),  # a plain 0-d tensor
        "bias": torch.randn(4, generator=g),  # a plain (replicated) tensor
    }


def save_sharded(rank: int, world: int, workdir: Path, out: str) -> None:
    """On each of 2 gloo ranks: ``dcp.save({"model": ...})`` of DTensors sharded by rows and by columns."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    placements = {"rows": Shard(0), "cols": Shard(1), "half": Shard(1), "one": Shard(0)}
    sd = {k: distribute_tensor(v, mesh, [placements[k]]) if k in placements else v for k, v in sharded_weights().items()}
    dcp.save({"model": sd}, checkpoint_id=out)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plain") / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(plain_weights(), checkpoint_id=str(folder), no_dist=True)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ranks import RankFailed, run_ranks

    work = tmp_path_factory.mktemp("two_ranks")
    out = work / "ckpt"
    results = run_ranks("sources.test_dcp_read_box:save_sharded", 2, work, args=(str(out),), timeout=180)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    return out


@pytest.fixture
def items_read(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Each stored item torch's FileSystemReader opens: (file, byte offset, length)."""
    seen: list[tuple[str, int, int]] = []
    original = FileSystemReader._slice_file

    def recording(self, file, sinfo):  # noqa: ANN001 - torch's signature
        seen.append((sinfo.relative_path, sinfo.offset, sinfo.length))
        return original(self, file, sinfo)

    monkeypatch.setattr(FileSystemReader, "_slice_file", recording)
    return seen


def overlapping(folder: Path, fqn: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """The stored items of ``fqn``'s saved chunks that share at least one element with the box."""
    md = read_metadata(folder / METADATA)
    out = []
    for chunk in md.state_dict_metadata[fqn].chunks:
        shares = all(max(o, co) < min(o + n, co + cn) for o, n, co, cn in zip(offset, shape, chunk.offsets, chunk.sizes))
        if shares and math.prod(shape) and math.prod(chunk.sizes):
            info = md.storage_data[MetadataIndex(fqn, chunk.offsets)]
            out.append((info.relative_path, info.offset, info.length))
    return sorted(out)


def boxes(size: tuple[int, ...], n: int, seed: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The whole tensor, an empty box at its far end, and ``n`` random boxes (empty ones included)."""
    g = torch.Generator().manual_seed(seed)
    out = [(tuple(0 for _ in size), size), (size, tuple(0 for _ in size))]
    for _ in range(n):
        offset = tuple(int(torch.randint(0, d + 1, (1,), generator=g)) for d in size)
        shape = tuple(int(torch.randint(0, d - o + 1, (1,), generator=g)) for o, d in zip(offset, size))
        out.append((offset, shape))
    return out


def cut(t: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def check_every_box(folder: Path, key: str | None, items_read: list, n: int = 40) -> int:
    """Every box of every tensor equals the slice of the whole tensor, read from exactly the
    overlapping chunks, each once; returns how many boxes were checked."""
    checked = 0
    with open_source(folder, key=key) as src:
        reader = src._owner[next(iter(src.meta))]
        for i, (name, meta) in enumerate(src.meta.items()):
            whole = src.read(name)
            for offset, shape in boxes(meta.shape, n, seed=i):
                items_read.clear()
                got = src.read_box(name, offset, shape)
                assert got is not None and got.dtype == whole.dtype and got.is_contiguous(), (name, offset, shape)
                assert tuple(got.shape) == shape and torch.equal(got, cut(whole, offset, shape)), (name, offset, shape)
                assert sorted(items_read) == overlapping(folder, reader.fqn(name), offset, shape), (name, offset, shape)
                checked += 1
    return checked


# ---------------------------------------------------------------------------- saved by one process


def test_plain_checkpoint_every_box_is_the_slice_of_the_whole(plain, items_read):
    assert check_every_box(plain, None, items_read) == 6 * 42
    with open_source(plain) as src:
        for k, v in plain_weights().items():
            assert torch.equal(src.read(k), v), k  # the wholes compared with are what was saved


def test_zero_dim_tensor_box_is_the_scalar(plain, items_read):
    with open_source(plain) as src:
        got = src.read_box("steps", (), ())
        assert got.shape == () and got.dtype == torch.int64 and int(got) == 17
        assert len(items_read) == 1


def test_empty_box_reads_nothing(plain, items_read):
    with open_source(plain) as src:
        for offset, shape in [((3, 0), (0, 5)), ((0, 2), (9, 0)), ((9, 5), (0, 0))]:
            got = src.read_box("embed.weight", offset, shape)
            assert tuple(got.shape) == shape and got.dtype == torch.float32
        assert src.read_box("empty", (0, 1), (0, 2)).shape == (0, 2)
    assert items_read == []


@pytest.mark.parametrize(
    ("offset", "shape"),
    [((0, 0), (10, 5)), ((8, 0), (2, 1)), ((0, 5), (1, 1)), ((9, 6), (0, 0)), ((-1, 0), (2, 2)), ((0,), (2,)),
     ((0, 0, 0), (1, 1, 1)), ((0, 0), (2, -1)), ((0.5, 0), (1, 1)), ((True, 0), (1, 1)), ("00", (1, 1))],
)  # fmt: skip
def test_box_outside_the_tensor_names_key_box_and_shape(plain, items_read, offset, shape):
    with open_source(plain) as src, pytest.raises(SourceError) as info:
        src.read_box("embed.weight", offset, shape)
    message = str(info.value)
    assert "'embed.weight'" in message and "[9, 5]" in message and repr(offset) in message and repr(shape) in message, message
    assert info.value.exit_code == 3 and items_read == []


def test_unknown_key_is_a_source_error(plain):
    with open_source(plain) as src, pytest.raises(SourceError, match=r"no tensor 'embed.weigth'.*did you mean 'embed.weight'"):
        src.read_box("embed.weigth", (0, 0), (1, 1))


# ---------------------------------------------------------------------------- saved by two ranks


def test_two_rank_checkpoint_has_the_chunks_the_tests_rely_on(sharded):
    sdm = read_metadata(sharded / METADATA).state_dict_metadata
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in sdm["model.rows"].chunks) == [((0, 0), (4, 3)), ((4, 0), (3, 3))]
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in sdm["model.cols"].chunks) == [((0, 0), (6, 5)), ((0, 5), (6, 4))]
    assert len(sdm["model.half"].chunks) == 2 and len(sdm["model.one"].chunks) in (1, 2)


def test_two_rank_checkpoint_every_box_is_the_slice_of_the_whole(sharded, items_read):
    assert check_every_box(sharded, None, items_read) == 6 * 42
    with open_source(sharded) as src:
        for k, v in sharded_weights().items():
            assert torch.equal(src.read(k), v), k


def test_box_inside_one_chunk_reads_only_that_chunk(sharded, items_read):
    with open_source(sharded) as src:
        whole = src.read("cols")
        items_read.clear()
        got = src.read_box("cols", (1, 5), (4, 4))  # columns 5..9: rank 1's chunk only
        assert torch.equal(got, whole[1:5, 5:9]) and len(items_read) == 1
        items_read.clear()
        got = src.read_box("cols", (2, 4), (1, 2))  # columns 4..6: across the border, both chunks
        assert torch.equal(got, whole[2:3, 4:6]) and len(items_read) == 2


def test_a_corrupt_chunk_fails_only_the_boxes_that_overlap_it(sharded, tmp_path):
    """Proof, without any counting, that a box never reads a chunk it does not overlap."""
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(sharded, folder)
    md = read_metadata(folder / METADATA)
    chunk = next(c for c in md.state_dict_metadata["model.rows"].chunks if c.offsets[0] == 4)
    info = md.storage_data[MetadataIndex("model.rows", chunk.offsets)]
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * 16)  # the stored item's zip header: torch.load cannot open it
    rows = sharded_weights()["rows"]
    with open_source(folder) as src:
        assert torch.equal(src.read_box("rows", (1, 0), (3, 3)), rows[1:4])
        with pytest.raises(SourceError, match=r"cannot read tensor 'rows'") as info_:
            src.read_box("rows", (3, 1), (2, 2))
        assert info_.value.exit_code == 3


# ---------------------------------------------------------------------------- through the wrappers


def test_combined_source_forwards_read_box(sharded):
    with CombinedSource({"a": open_source(sharded)}) as src:
        whole = src.read("a:cols")
        assert torch.equal(src.read_box("a:cols", (0, 3), (6, 4)), whole[:, 3:7])


def test_sources_without_read_box_answer_none(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 2)}, str(tmp_path / "w.safetensors"))
    with open_source(tmp_path / "w.safetensors") as src:
        assert src.read_box("w", (1, 0), (2, 2)) is None
    assert open_source({"w": torch.ones(4, 2)}).read_box("w", (1, 0), (2, 2)) is None
    assert open_source({"w": ([4, 2], "float32")}).read_box("w", (1, 0), (2, 2)) is None
