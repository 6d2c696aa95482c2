"""CPU QuantLinear forward vs fp32 nn.Linear at 4096 x 4096, int4, group 128.

Measures tokens/s for batch 1 and batch 64 (one token per row), the ratio to nn.Linear, the
cost of building a layer from a packed checkpoint tensor (unpack + dequantize, paid once), and
the ``cache_weight=False`` path (dequantize on every call, one vectorised gather). Writes a
markdown table to benches/results/quantlinear-cpu.md.

    python benches/bench_quantlinear.py [--features 4096] [--seconds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from ferroquant import solver
from ferroquant.config import QuantizationArgs
from ferroquant.nn import QuantLinear
from torch import nn


def rate(fn, tokens: int, seconds: float) -> tuple[float, float]:
    """(tokens/s, ms per call) after a warm-up, over at least ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return tokens * n / dt, 1e3 * dt / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantlinear-cpu.md"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n, gs = a.features, a.group_size
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, n), generator=g, dtype=torch.int32).to(torch.uint8)
    ng = n // gs
    scales = torch.rand(n, ng, generator=g) * 0.01 + 0.001
    zeros = torch.full((n, ng), 8, dtype=torch.int32)
    g_idx = torch.arange(n, dtype=torch.int32) // gs
    args = QuantizationArgs(num_bits=4, group_size=gs)

    # load-time cost: unpack a compressed-tensors weight_packed and build the dequantized cache
    packed = solver.pack_ct_weight(codes, 4)
    t0 = time.perf_counter()
    unpacked = solver.unpack_ct_weight(packed, 4, n)
    t_unpack = time.perf_counter() - t0
    assert torch.equal(unpacked, codes)
    ql = QuantLinear(unpacked, scales, zeros, g_idx, args, dtype=torch.float32)
    t0 = time.perf_counter()
    ql.weight_for_forward()
    t_deq = time.perf_counter() - t0

    ref = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        ref.weight.copy_(ql.weight_for_forward())
    nocache = QuantLinear(codes, scales, zeros, g_idx, args, dtype=torch.float32, cache_weight=False)

    rows = []
    with torch.inference_mode():
        for batch in (1, 64):
            x = torch.randn(batch, n, generator=g)
            assert torch.equal(ql(x), ref(x))
            r_ref, ms_ref = rate(lambda x=x: ref(x), batch, a.seconds)
            r_q, ms_q = rate(lambda x=x: ql(x), batch, a.seconds)
            r_nc, ms_nc = rate(lambda x=x: nocache(x), batch, a.seconds)
            rows.append((batch, r_ref, ms_ref, r_q, ms_q, r_nc, ms_nc))
            print(f"batch {batch:3d}: nn.Linear fp32 {r_ref:10.1f} tok/s | QuantLinear {r_q:10.1f} tok/s "
                  f"({r_q / r_ref:.2f}x) | no cache {r_nc:8.1f} tok/s ({r_nc / r_ref:.3f}x)")

    cpu = platform.processor() or platform.machine()
    lines = [
        "# QuantLinear forward on CPU",
        "",
        (f"{n} x {n}, int4, group {gs}, symmetric; fp32 activations; torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, {cpu}, load average {os.getloadavg()[0]:.1f} while "
         "measuring (a shared machine is noisy). Command: `python benches/bench_quantlinear.py`."),
        "",
        "| batch (tokens) | nn.Linear fp32 tok/s | QuantLinear tok/s | ratio | QuantLinear `cache_weight=False` tok/s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b, r_ref, ms_ref, r_q, ms_q, r_nc, ms_nc in rows:
        lines.append(f"| {b} | {r_ref:,.0f} ({ms_ref:.2f} ms) | {r_q:,.0f} ({ms_q:.2f} ms) | "
                     f"{r_q / r_ref:.2f} | {r_nc:,.0f} ({ms_nc:.2f} ms) | {r_nc / r_ref:.3f} |")
    lines += [
        "",
        (f"One-time cost when loading the layer: unpack `weight_packed` (Rust) {1e3 * t_unpack:.1f} ms, "
         f"dequantize into the cached fp32 weight {1e3 * t_deq:.1f} ms."),
        "",
        ("QuantLinear unpacks once at load and caches the dequantized weight, so its forward is the "
         "same `F.linear` as nn.Linear (ratio ~1; memory: 1 byte/weight of codes + the cache). "
         "`cache_weight=False` keeps only the codes and re-dequantizes on every call: the price of "
         "not having a fused int4 CPU kernel."),
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
