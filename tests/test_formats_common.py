"""Shared helpers for the format tests (tiny models, quantizing each Linear with the Rust solver,
an independent GPTQ decoder) and tests of the pieces every format uses: atomic directory
writing, size parsing and the validated safetensors reader."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from ferroquant import solver
from ferroquant.config import QuantizationArgs
from ferroquant.formats.common import (
    CheckpointError,
    CheckpointFiles,
    atomic_directory,
    check_replaceable,
    parse_size,
    read_safetensors_header,
)
from ferroquant.quantized import ATTR, QuantizedWeight
from torch import nn

# ---------------------------------------------------------------------------------------------
# helpers (imported by the other test_formats*/test_load*/test_interop* files)


def tiny_llama(seed: int = 0, *, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4,
               kv: int = 2, vocab: int = 96, tie: bool = True, bias: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
        tie_word_embeddings=tie, max_position_embeddings=128, attention_bias=bias, mlp_bias=bias,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init so quantization error is visible
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in n:
                p.normal_(0, 0.05)
    return model


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def args_of(bits: int = 4, group_size: int = 32, sym: bool = True, actorder: str | None = None) -> QuantizationArgs:
    if group_size == -1:
        return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="channel", group_size=None, actorder=actorder)
    return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="group", group_size=group_size, actorder=actorder)


def quantize(model: nn.Module, args: QuantizationArgs, names: list[str] | None = None,
             method: str | None = None, seed: int = 0, scales_fp16: bool = False) -> nn.Module:
    """Quantize each named Linear in place (as the pipeline does: attach ``fq_quant`` and write
    the dequantized weight back). RTN unless act-order needs GPTQ; ``scales_fp16`` rounds the
    scales (and biases) to fp16 first so the in-memory model equals a GPTQ checkpoint bit for bit."""
    g = torch.Generator().manual_seed(seed)
    method = method or ("gptq" if args.actorder else "rtn")
    for name in names if names is not None else block_linears(model):
        mod = model.get_submodule(name)
        w = mod.weight.data.float()
        gs = args.effective_group_size
        if method == "rtn":
            r = solver.rtn_quantize(w, bits=args.num_bits, symmetric=args.symmetric, group_size=gs, name=name)
        else:
            # column scales spread over two decades, so act-order really permutes
            x = torch.randn(256, w.shape[1], generator=g) * torch.logspace(-1, 1, w.shape[1])[torch.randperm(w.shape[1], generator=g)]
            h = 2.0 * x.T @ x / x.shape[0]
            r = solver.gptq_quantize(
                w, h, bits=args.num_bits, symmetric=args.symmetric, group_size=gs,
                act_order=args.actorder is not None, static_groups=args.actorder == "static", name=name,
            )
        scales = r.scales.half().float() if scales_fp16 else r.scales
        q = QuantizedWeight(r.codes.to(torch.uint8), scales, r.zeros.to(torch.int32), r.g_idx.to(torch.int32), args)
        mod.weight.data = q.dequantize(mod.weight.dtype)
        if scales_fp16 and mod.bias is not None:  # GPTQ stores the bias in fp16 too
            mod.bias.data = mod.bias.data.half().to(mod.bias.dtype)
        setattr(mod, ATTR, q)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def ids_for(vocab: int, n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, n), generator=g)


def tree_digest(d: Path) -> dict[str, str]:
    """Name -> sha256 of every file under d (to prove a directory was not touched)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# --- an independent decoder of the published GPTQ layout (numpy, no ferroquant code) ---------


def gptq_decode_qweight(qweight: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """[in*b/32, out] int32 -> codes [in, out]: value i of a column lives at bit i*b of the
    column's bit stream, words taken in order, low bits first (3-bit values straddle words)."""
    words = qweight.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((in_features, words.shape[1]), dtype=np.int64)
    mask = (1 << bits) - 1
    for i in range(in_features):
        bit = i * bits
        w, off = divmod(bit, 32)
        v = words[w] >> off
        if off + bits > 32:
            v = v | (words[w + 1] << (32 - off))
        out[i] = v & mask
    return out


def gptq_decode_qzeros(qzeros: np.ndarray, bits: int, out_features: int, version: int) -> np.ndarray:
    """[ng, out*b/32] -> zeros [ng, out]; v1 stored zero-1, so add the 1 back."""
    z = gptq_decode_qweight(qzeros.T.copy(), bits, out_features).T
    return z + 1 if version == 1 else z


def gptq_encode(codes_in_out: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of gptq_decode_qweight, used to write fixtures as another tool would."""
    n_in, n_out = codes_in_out.shape
    words = np.zeros((n_in * bits // 32, n_out), dtype=np.int64)
    for i in range(n_in):
        bit = i * bits
        w, off = divmod(bit, 32)
        v = codes_in_out[i].astype(np.int64)
        words[w] |= (v << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[w + 1] |= v >> (32 - off)
    return words.astype(np.uint32).view(np.int32)


# ---------------------------------------------------------------------------------------------
# tests


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    assert parse_size(None) is None
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("two gigs")


def _fake_checkpoint(d: Path, tag: str) -> None:
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_text(tag)


def test_atomic_directory_success_and_failure(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        _fake_checkpoint(tmp, "1")
        assert not out.exists()  # nothing under the final name while writing
    assert (out / "model.safetensors").read_text() == "1"
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_directory(out):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out, overwrite=True) as tmp:
        _fake_checkpoint(tmp, "2")
        raise RuntimeError("boom")
    assert (out / "model.safetensors").read_text() == "1"  # old one untouched
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model-00001-of-00002.safetensors").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp/old leftovers
    # an empty directory may be replaced too
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty", overwrite=True) as tmp:
        _fake_checkpoint(tmp, "4")
    assert (tmp_path / "empty" / "model.safetensors").read_text() == "4"


@pytest.mark.parametrize("present", [["notes.txt"], ["config.json"], ["model.safetensors"],
                                     ["config.json", "sub/model.safetensors"]])
def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path, present) -> None:
    out = tmp_path / "mine"
    for name in present:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("keep me")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with (pytest.raises(FileExistsError, match=r"is not a checkpoint directory .*holds .*left alone"),
          atomic_directory(out, overwrite=True) as tmp):
        _fake_checkpoint(tmp, "new")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert all((out / n).read_text() == "keep me" for n in present)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing left beside it
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_replaceable(f, overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_directory_permissions_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "ck") as tmp:
            _fake_checkpoint(tmp, "1")
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "ck").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def _write_st(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_header_validation(tmp_path: Path) -> None:
    p = tmp_path / "model.safetensors"
    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "I32", "shape": [3], "data_offsets": [16, 28]}}
    _write_st(p, good, bytes(28))
    assert set(read_safetensors_header(p)) == {"a", "b"}
    cases = {
        "truncated": (good, bytes(20), r"'b'.*truncated"),
        "size lie": ({**good, "b": {"dtype": "I32", "shape": [4], "data_offsets": [16, 28]}}, bytes(28),
                     r"'b'.*needs 16 bytes"),
        "overlap": ({**good, "b": {"dtype": "I32", "shape": [3], "data_offsets": [8, 20]}}, bytes(28), r"'b'.*overlaps"),
        "dtype": ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "unknown dtype"),
    }
    for what, (header, data, pat) in cases.items():
        _write_st(p, header, data)
        with pytest.raises(CheckpointError, match=pat) as ei:
            read_safetensors_header(p)
        assert str(p) in str(ei.value), what
    p.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(p)
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="runs past the end"):
        read_safetensors_header(p)


def test_header_files_read_without_torch(tmp_path: Path) -> None:
    from ferroquant.headers.files import HeaderFiles

    shape = struct.pack("<2q", 172, 64)
    _write_st(tmp_path / "model.safetensors",
              {"s": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
               "w": {"dtype": "F16", "shape": [2, 2], "data_offsets": [16, 24]}}, shape + bytes(8))
    files = HeaderFiles(tmp_path)
    assert files.read_ints("s") == [172, 64]
    assert (files.info("w").dtype_name, files.info("w").nbytes) == ("float16", 8)
    files.expect("w", ("F16", "F32"), (2, 2))
    with pytest.raises(CheckpointError, match="'w' has dtype float16, expected int32 or int64"):
        files.expect("w", ("I32", "I64"), None)
    # torch dtypes are accepted too (by name: the header module does not import torch)
    files.expect("w", (torch.float32, torch.float16), (2, 2))
    with pytest.raises(CheckpointError, match="'s' has dtype int64, expected float8_e4m3fn"):
        files.expect("s", torch.float8_e4m3fn, None)
    with pytest.raises(CheckpointError, match="expected an integer dtype"):
        files.read_ints("w")
    # the torch-side reader is the same header check plus tensor reading
    assert torch.equal(CheckpointFiles(tmp_path).get("s"), torch.tensor([172, 64]))


def test_checkpoint_files_missing_shard(tmp_path: Path) -> None:
    _write_st(tmp_path / "model-00001-of-00002.safetensors",
              {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors.*missing.*'b'"):
        CheckpointFiles(tmp_path)


def test_independent_gptq_codec_round_trip() -> None:
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 2**bits, size=(64, 5))
        packed = gptq_encode(codes, bits)
        assert packed.shape == (64 * bits // 32, 5)
        assert np.array_equal(gptq_decode_qweight(packed, bits, 64), codes)
