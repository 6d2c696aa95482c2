"""QuantLinear keeps packed codes: the bit layout, exact dequantization (the one rule shared
with QuantizedWeight), chunked forwards, the opt-in cache and device/dtype moves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ferroquant import nn as fqnn
from ferroquant import solver
from ferroquant.config import QuantizationArgs
from ferroquant.nn import QuantLinear, pack_codes
from ferroquant.quantized import QuantizedWeight, dequantize, group_width


def _weight(out_f: int, in_f: int, bits: int, gs: int, actorder: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    ng = -(-in_f // gs) if gs > 0 else 1
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(out_f, ng, generator=g) * 0.1 + 1e-3
    zeros = torch.randint(0, 1 << bits, (out_f, ng), generator=g, dtype=torch.int32)
    if gs > 0:
        g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    else:
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    if actorder:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    args = QuantizationArgs(num_bits=bits, group_size=gs if gs > 0 else None,
                            strategy="group" if gs > 0 else "channel", symmetric=False)
    return QuantizedWeight(codes, scales, zeros, g_idx, args)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f", [32, 37, 96])
def test_pack_unpack_round_trip(bits: int, in_f: int) -> None:
    codes = _weight(6, in_f, bits, -1, False, seed=bits).codes
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, -(-in_f * bits // 32))
    assert torch.equal(solver.unpack_ct_weight(packed, bits, in_f), codes)  # the core's layout
    assert torch.equal(fqnn._Unpacker(in_f, bits, packed.device)(packed).to(torch.uint8), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,gs,actorder", [(4, 16, False), (3, 32, True), (8, -1, False), (4, 24, False)])
def test_dequantize_and_forward_are_exact(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, bits: int,
                                          gs: int, actorder: bool) -> None:
    q = _weight(40, 96, bits, gs, actorder)
    ref = q.dequantize(dtype)
    # The rule itself, written out: float32 product, then one cast.
    g = q.g_idx.long()
    assert torch.equal(ref, (q.scales[:, g] * (q.codes.float() - q.zeros[:, g].float())).to(dtype))
    assert group_width(q.g_idx, q.n_groups) == (0 if actorder or 96 % gs else gs if gs > 0 else 96)
    # Both paths of the shared function agree (broadcast over equal groups, gather otherwise).
    assert torch.equal(dequantize(q.codes, q.scales, q.zeros, q.g_idx, dtype, width=0), ref)
    bias = torch.randn(40)
    ql = QuantLinear.from_quantized(q, bias, dtype=dtype)
    assert torch.equal(ql.codes, q.codes)
    assert torch.equal(ql.dequantize(), ref)
    x = torch.randn(3, 96).to(dtype)
    assert torch.equal(ql(x), F.linear(x, ref, bias.to(dtype)))
    assert ql._weight is None
    # Small chunks of output rows (including a ragged last one) give the same weight.
    monkeypatch.setattr(fqnn, "CHUNK_ELEMENTS", 96 * 7)
    assert torch.equal(ql.dequantize(), ref)
    assert torch.equal(ql(x), F.linear(x, ref, bias.to(dtype)))


def test_memory_is_the_packed_codes_and_cache_is_opt_in() -> None:
    q = _weight(256, 256, 4, 128, False)
    ql = QuantLinear.from_quantized(q)
    held = sum(b.numel() * b.element_size() for b in ql.buffers())
    assert ql.packed.numel() * 4 == 256 * 256 // 2  # 4 bits a code
    assert held < 256 * 256 * 2 * 0.3  # under 30% of an fp16 weight (codes, scales, zeros, g_idx)
    x = torch.randn(2, 256)
    ql(x)
    assert ql._weight is None
    cached = QuantLinear.from_quantized(q, cache_dequantized=True)
    y = cached(x)
    assert cached._weight is not None and torch.equal(y, ql(x))
    cached.to(torch.bfloat16)
    assert cached._weight is None and cached.compute_dtype == torch.bfloat16
    assert cached.packed.dtype == torch.int32 and cached.scales.dtype == torch.float32
    assert torch.equal(cached.dequantize(), q.dequantize(torch.bfloat16))


def test_refuses_codes_wider_than_bits() -> None:
    q = _weight(4, 32, 4, -1, False)
    q.codes[0, 0] = 16
    with pytest.raises(ValueError, match="codes exceed 15 for 4 bits"):
        QuantLinear.from_quantized(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_is_exact() -> None:
    q = _weight(48, 128, 3, 32, True)
    ql = QuantLinear.from_quantized(q, dtype=torch.float16).cuda()
    x = torch.randn(5, 128, device="cuda", dtype=torch.float16)
    ref = q.dequantize(torch.float16).cuda()
    assert torch.equal(ql.dequantize(), ref)
    assert torch.equal(ql(x), F.linear(x, ref))
