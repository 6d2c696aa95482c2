"""Bit packing through the Python API: exact round trips, hand-worked bit positions, and
compressed-tensors' own packer as a second opinion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ferroquant import _core, solver

BITS = [2, 3, 4, 8]


def u32(x: int) -> int:
    """A 32-bit pattern as the signed int32 value numpy/torch hold."""
    return x - (1 << 32) if x >= 1 << 31 else x


def rand_codes(shape: tuple[int, int], bits: int, low: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 2**bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("inp", [64, 96, 72, 37])
def test_gptq_qweight_round_trip(bits: int, inp: int) -> None:
    codes = rand_codes((24, inp), bits, seed=bits * inp)
    q = solver.pack_gptq_qweight(codes, bits)
    assert q.dtype == torch.int32 and q.shape[1] == 24
    if inp % 32 == 0:
        assert q.shape[0] == inp * bits // 32
    else:
        assert q.shape[0] >= math.ceil(inp * bits / 32)
    assert torch.equal(solver.unpack_gptq_qweight(q, bits, inp), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("out", [64, 37])
def test_gptq_qzeros_round_trip(bits: int, version: int, out: int) -> None:
    zeros = rand_codes((5, out), bits, low=1 if version == 1 else 0, seed=out + bits).to(
        torch.int32
    )
    q = solver.pack_gptq_qzeros(zeros, bits, version)
    assert q.dtype == torch.int32 and q.shape[0] == 5
    if out % 32 == 0:
        assert q.shape[1] == out * bits // 32
    got = solver.unpack_gptq_qzeros(q, bits, out, version)
    assert got.dtype == torch.int32 and torch.equal(got, zeros)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("inp", [64, 72, 37])
def test_ct_weight_round_trip_and_compressed_tensors(bits: int, inp: int) -> None:
    codes = rand_codes((24, inp), bits, seed=bits + inp)
    p = solver.pack_ct_weight(codes, bits)
    assert p.dtype == torch.int32 and p.shape == (24, math.ceil(inp * bits / 32))
    assert torch.equal(solver.unpack_ct_weight(p, bits, inp), codes)
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = (codes.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(p, helpers.pack_to_int32(signed, bits, packed_dim=1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out", [64, 37])
def test_ct_zero_point_round_trip_and_compressed_tensors(bits: int, out: int) -> None:
    zeros = rand_codes((out, 3), bits, seed=7 * bits + out)
    p = solver.pack_ct_zero_point(zeros, bits)
    assert p.dtype == torch.int32 and p.shape == (math.ceil(out * bits / 32), 3)
    assert torch.equal(solver.unpack_ct_zero_point(p, bits, out), zeros)
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = (zeros.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(p, helpers.pack_to_int32(signed, bits, packed_dim=0))


# ----------------------------------------------------------------------------------------------
# hand-worked examples: the expected words are written out bit by bit
# ----------------------------------------------------------------------------------------------


def test_gptq_qweight_by_hand() -> None:
    # 4-bit, one output, inputs 0..7 = 1..8: input i sits at bits 4i..4i+3 -> 0x87654321.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert solver.pack_gptq_qweight(codes, 4).tolist() == [[u32(0x87654321)]]
    # Packed along the input: two outputs are two columns of the same word row.
    two = torch.tensor([[1] * 8, [15] + [0] * 7], dtype=torch.uint8)
    assert solver.pack_gptq_qweight(two, 4).tolist() == [[0x11111111, 0x0000000F]]
    # 8-bit: [1, 2, 3, 255] -> 0xFF030201; 2-bit: input i at bits 2i: 3 at i=0 and i=15.
    assert solver.pack_gptq_qweight(
        torch.tensor([[1, 2, 3, 255]], dtype=torch.uint8), 8
    ).tolist() == [[u32(0xFF030201)]]
    c2 = torch.zeros(1, 16, dtype=torch.uint8)
    c2[0, 0], c2[0, 15] = 3, 3
    assert solver.pack_gptq_qweight(c2, 2).tolist() == [[u32(0xC0000003)]]
    # 3-bit, 32 inputs in 3 words: word0 = v0..v9 at 3i, then v10's low 2 bits at 30-31;
    # word1 = v10's high bit at 0, v11..v20 at 3(i-11)+1, v21's low bit at 31;
    # word2 = v21's high 2 bits at 0-1, v22..v31 at 3(i-22)+2.
    c3 = torch.zeros(1, 32, dtype=torch.uint8)
    c3[0, 0], c3[0, 10], c3[0, 11], c3[0, 21], c3[0, 31] = 1, 5, 2, 6, 7
    # v0=1 -> bit 0; v10=0b101 -> bit 30 (low bits 01) and word1 bit 0 (high bit 1);
    # v11=0b010 -> word1 bit 2; v21=0b110 -> word1 bit 31 = 0, word2 bits 0-1 = 0b11;
    # v31=0b111 -> word2 bits 29-31.
    assert solver.pack_gptq_qweight(c3, 3).T.tolist() == [[0x40000001, 0x00000005, u32(0xE0000003)]]


def test_gptq_qzeros_by_hand() -> None:
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int32)
    # v1 stores zero - 1 (0..7 -> 0x76543210), v2 the raw zero.
    assert solver.pack_gptq_qzeros(zeros, 4, version=1).tolist() == [[0x76543210]]
    assert solver.pack_gptq_qzeros(zeros, 4, version=2).tolist() == [[u32(0x87654321)]]
    # Packed along the output: two groups are two rows.
    z2 = torch.tensor([[8] * 8, [1] * 8], dtype=torch.int32)
    assert solver.pack_gptq_qzeros(z2, 4, version=1).tolist() == [[0x77777777], [0]]
    # 2-bit symmetric zero 2, v1: every field holds 1 -> 0x55555555.
    assert solver.pack_gptq_qzeros(torch.full((1, 16), 2, dtype=torch.int32), 2).tolist() == [
        [0x55555555]
    ]


def test_ct_weight_by_hand() -> None:
    # 4-bit, within a row along the input: 0..7 -> 0x76543210 (values already shifted).
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [8] * 8], dtype=torch.uint8)
    assert solver.pack_ct_weight(codes, 4).tolist() == [[0x76543210], [u32(0x88888888)]]
    # 3-bit dense: 11 inputs -> 33 bits -> 2 words; v0=5 at bits 0-2, v10=7 at bits 30-32.
    c3 = torch.zeros(1, 11, dtype=torch.uint8)
    c3[0, 0], c3[0, 10] = 5, 7
    assert solver.pack_ct_weight(c3, 3).tolist() == [[u32(0xC0000005), 0x00000001]]


def test_ct_zero_point_by_hand() -> None:
    # Packed along dim 0 (outputs): column g holds group g of outputs 0..7.
    zeros = torch.tensor(
        [[0, 8], [1, 8], [2, 8], [3, 8], [4, 8], [5, 8], [6, 8], [7, 8]], dtype=torch.uint8
    )
    assert solver.pack_ct_zero_point(zeros, 4).tolist() == [[0x76543210, u32(0x88888888)]]


def test_pack_errors() -> None:
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits must be one of 2, 3, 4, 8 \(got 5\)"):
        solver.pack_gptq_qweight(codes, 5)
    with pytest.raises(ValueError, match=r"codes: array is empty \(shape \[0, 32\]\)"):
        solver.pack_ct_weight(torch.zeros(0, 32, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"codes: values must fit torch.uint8"):
        solver.pack_ct_weight(torch.full((2, 8), 300, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"codes: expected an integer tensor"):
        solver.pack_ct_weight(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match=r"version must be 1 \(stores zero - 1\) or 2"):
        solver.pack_gptq_qzeros(torch.ones(1, 8, dtype=torch.int32), 4, version=3)
    with pytest.raises(ValueError, match=r"codes: expected dtype uint8, got int32"):
        _core.pack_gptq_qweight(np.zeros((4, 32), np.int32), 4)
    with pytest.raises(ValueError, match=r"codes: expected a 2-D uint8 array, got 1 dimensions"):
        _core.pack_gptq_qweight(np.zeros(32, np.uint8), 4)
    with pytest.raises(ValueError, match=r"in_features must be a positive integer \(got 0\)"):
        _core.unpack_ct_weight(np.zeros((4, 4), np.int32), 4, 0)
    # Codes above 2^bits - 1 and a v1 zero of 0 are the core's to refuse, with a message.
    with pytest.raises(ValueError) as e:
        solver.pack_gptq_qweight(torch.full((2, 8), 16, dtype=torch.uint8), 4)
    assert "16" in str(e.value)
    with pytest.raises(ValueError) as e:
        solver.pack_gptq_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, version=1)
    assert "zero" in str(e.value)
