"""safetensors writing through the Python API, checked by loading with the safetensors library."""

from __future__ import annotations

import gc
import json
import os
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from ferroquant import _core, solver
from safetensors import safe_open
from safetensors.torch import load_file


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.qweight": torch.randint(
            -(2**31), 2**31 - 1, (16, 64), generator=g, dtype=torch.int32
        ),
        "model.layers.0.self_attn.q_proj.scales": torch.randn(2, 64, generator=g).half(),
        "model.embed_tokens.weight": torch.randn(100, 32, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g),
        "model.layers.0.g_idx": torch.arange(128, dtype=torch.int64),
        "packed.i8": torch.randint(-128, 127, (7, 3), generator=g, dtype=torch.int8),
        "packed.u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
    }


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_single_file_round_trip(tmp_path: Path) -> None:
    ts = tensors()
    paths = solver.write_safetensors(
        tmp_path, ts, metadata={"format": "pt", "quantizer": "ferroquant"}
    )
    assert paths == [tmp_path / "model.safetensors"]
    loaded = load_file(paths[0])
    assert set(loaded) == set(ts)
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    with safe_open(paths[0], "pt") as f:
        assert f.metadata() == {"format": "pt", "quantizer": "ferroquant"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_sharded_index(tmp_path: Path) -> None:
    ts = tensors()
    total = sum(nbytes(t) for t in ts.values())
    paths = solver.write_safetensors(tmp_path, ts, stem="shard", max_shard_bytes=4096)
    shards = [p for p in paths if p.name.endswith(".safetensors")]
    assert len(shards) >= 2
    n = len(shards)
    assert sorted(p.name for p in shards) == [
        f"shard-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    index_path = tmp_path / "shard.safetensors.index.json"
    assert index_path in paths and index_path.exists()
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(ts)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        for k in part:
            assert index["weight_map"][k] == shard.name
        merged.update(part)
    assert set(merged) == set(ts)
    for k, v in ts.items():
        assert torch.equal(merged[k], v), k
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_numpy_level_bf16_as_int16(tmp_path: Path) -> None:
    t = torch.randn(4, 6).to(torch.bfloat16)
    _core.write_safetensors(str(tmp_path), [("w", t.view(torch.int16).numpy(), "BF16")], stem="x")
    assert torch.equal(load_file(tmp_path / "x.safetensors")["w"], t)


def test_failures_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"tensor .w. appears twice"):
        _core.write_safetensors(str(out), [("w", a, "F32"), ("w", a, "F32")])
    with pytest.raises(
        ValueError, match=r"tensor 'w': dtype F16 needs 2-byte elements, got a float32 array"
    ):
        _core.write_safetensors(str(out), [("w", a, "F16")])
    with pytest.raises(ValueError, match=r"tensor 'w': unknown safetensors dtype 'F64'"):
        _core.write_safetensors(str(out), [("w", a, "F64")])
    with pytest.raises(ValueError, match=r"tensor 'w': array must be C-contiguous"):
        _core.write_safetensors(str(out), [("w", np.zeros((3, 2), np.float32).T, "F32")])
    with pytest.raises(ValueError, match=r"tensor 'w': array is big-endian"):
        _core.write_safetensors(str(out), [("w", a.astype(">f4"), "F32")])
    with pytest.raises(ValueError, match=r"tensor 'c': dtype torch.complex64 is not supported"):
        solver.write_safetensors(out, {"c": torch.zeros(2, dtype=torch.complex64)})
    assert list(out.iterdir()) == []

    # The target directory is a file: an OSError naming it, and no stray temporary file.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"blocker"):
        solver.write_safetensors(blocker, tensors())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "out"]

    # A failure while writing the second shard (its temporary name, `.{stem}-{i:05}.safetensors
    # .tmp-{pid}` per the core's docs, is taken by a directory): no shard, index or temporary
    # may remain.
    probe = solver.write_safetensors(tmp_path / "probe", tensors(), stem="m", max_shard_bytes=4096)
    shard_names = sorted(p.name for p in probe if p.name.endswith(".safetensors"))
    assert len(shard_names) >= 2
    blocked_tmp = f".m-00002.safetensors.tmp-{os.getpid()}"
    (out / blocked_tmp).mkdir()
    with pytest.raises(OSError, match=r"shard 2 of m\.safetensors .*" + re.escape(blocked_tmp)):
        solver.write_safetensors(out, tensors(), stem="m", max_shard_bytes=4096)
    assert sorted(p.name for p in out.iterdir()) == [blocked_tmp]
    (out / blocked_tmp).rmdir()

    # A failure while renaming into place (the second shard's final name is a directory):
    # no temporary and no index remain, so no loadable half-checkpoint is left. (Shards
    # renamed before the failure are complete files and stay: the core's documented choice.)
    (out / shard_names[1]).mkdir()
    with pytest.raises(OSError, match=re.escape(shard_names[1])):
        solver.write_safetensors(out, tensors(), stem="m", max_shard_bytes=4096)
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if ".tmp-" in n or n.endswith(".index.json")], left


def test_streams_shard_by_shard_from_borrowed_buffers(tmp_path: Path) -> None:
    """A generator is consumed one shard at a time: a tensor is released once its shard is on
    disk (the writer kept no copy and no reference), and what comes back through the
    safetensors library equals what was given, whatever the input layout."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    expected = {
        "a": torch.randn(32, 32, generator=g),  # 4096 bytes: a shard of its own
        "b": torch.randint(0, 255, (1000,), generator=g, dtype=torch.uint8),
        "c.t": base.t(),  # non-contiguous: copied for its shard only
        "d.bf16": torch.randn(7, 9, generator=g).to(torch.bfloat16),
        "e": torch.tensor([1, -2, 3], dtype=torch.int64),
    }
    refs: dict[str, weakref.ref] = {}
    released_while_streaming: list[str] = []

    def produce():
        for name, t in expected.items():
            if name == "d.bf16":  # by now "a" (shard 1) and "b" (shard 2) are on disk
                gc.collect()
                released_while_streaming.extend(n for n in ("a", "b") if refs[n]() is None)
            fresh = t.clone() if t.is_contiguous() else t
            refs[name] = weakref.ref(fresh)
            yield name, fresh
            del fresh

    paths = solver.write_safetensors(tmp_path, produce(), max_shard_bytes=4096)
    assert released_while_streaming == ["a", "b"]
    shards = [p for p in paths if p.name.endswith(".safetensors")]
    assert len(shards) == 4 and paths[-1].name == "model.safetensors.index.json"
    index = json.loads(paths[-1].read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                assert index["weight_map"][k] == shard.name
                got[k] = f.get_tensor(k)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in expected.values())


def test_generator_errors_leave_nothing(tmp_path: Path) -> None:
    def produce():
        yield "a", torch.zeros(2000, dtype=torch.uint8)
        yield "b", torch.zeros(2000, dtype=torch.uint8)  # shard 1 ends here: written to a temporary
        raise RuntimeError("producer failed")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="producer failed"):
        solver.write_safetensors(out, produce(), max_shard_bytes=2000)
    assert list(out.iterdir()) == []
    with pytest.raises(TypeError, match="expected an iterable"):
        _core.write_safetensors(str(out), 3)
