"""CPU QuantLinear, packed (default) and cached modes, against nn.Linear: memory and speed.

One 4096 x 4096 layer, int4, group 128. Memory: the bytes each module holds after a forward
(buffers, parameters and, in the cached mode, the dequantized weight), against nn.Linear's
weight in the same dtype. Speed: tokens/s at batch 1 and batch 64 (one token per row), in
float32 and bfloat16. Every timed output is first checked equal to nn.Linear's on the same
dequantized weight. Writes a markdown table to benches/results/quantlinear-cpu.md.

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
from ferroquant.nn import QuantLinear, _Unpacker, pack_codes
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


def held_bytes(m: nn.Module) -> int:
    total = sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))
    w = getattr(m, "_weight", None)
    return total + (w.numel() * w.element_size() if w is not None else 0)


def mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


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

    # The per-forward unpack: the core's unpacker against torch bit ops (what accelerators use).
    words = pack_codes(codes, 4)
    unpack_ms = {}
    for label, fn in (("core (Rust)", lambda: solver.unpack_ct_weight(words, 4, n)),
                      ("torch bit ops", lambda: _Unpacker(n, 4, words.device)(words))):
        assert torch.equal(fn().to(torch.uint8), codes)
        unpack_ms[label] = rate(fn, 1, a.seconds)[1]
    print("unpack " + ", ".join(f"{k} {v:.1f} ms" for k, v in unpack_ms.items()))

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        packed = QuantLinear(codes, scales, zeros, g_idx, args, dtype=dtype)
        t_build = time.perf_counter() - t0
        cached = QuantLinear(codes, scales, zeros, g_idx, args, dtype=dtype, cache_dequantized=True)
        t0 = time.perf_counter()
        w = packed.dequantize()
        t_deq = time.perf_counter() - t0
        ref = nn.Linear(n, n, bias=False, dtype=dtype)
        with torch.no_grad():
            ref.weight.copy_(w)
        del w
        with torch.inference_mode():
            for batch in (1, 64):
                x = torch.randn(batch, n, generator=g).to(dtype)
                want = ref(x)
                assert torch.equal(packed(x), want) and torch.equal(cached(x), want)
                r_ref, ms_ref = rate(lambda x=x, f=ref: f(x), batch, a.seconds)
                r_p, ms_p = rate(lambda x=x, f=packed: f(x), batch, a.seconds)
                r_c, ms_c = rate(lambda x=x, f=cached: f(x), batch, a.seconds)
                rows.append((str(dtype).removeprefix("torch."), batch, r_ref, ms_ref, r_p, ms_p, r_c, ms_c,
                             held_bytes(ref), held_bytes(packed), held_bytes(cached), t_build, t_deq))
                print(f"{dtype} batch {batch:3d}: nn.Linear {r_ref:9.1f} tok/s | packed {r_p:9.1f} tok/s "
                      f"({r_p / r_ref:.3f}x) | cached {r_c:9.1f} tok/s ({r_c / r_ref:.2f}x) | held "
                      f"{mib(held_bytes(ref))} / {mib(held_bytes(packed))} / {mib(held_bytes(cached))}")

    cpu = platform.processor() or platform.machine()
    lines = [
        "# QuantLinear on CPU: packed (default) and cached modes",
        "",
        (f"{n} x {n}, int4, group {gs}; torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
         f"load average {os.getloadavg()[0]:.1f} while measuring (a shared machine is noisy). "
         "Command: `python benches/bench_quantlinear.py`. Memory is what each module holds after a "
         "forward; every output was checked equal to nn.Linear's on the same weight."),
        "",
        "| dtype | batch | nn.Linear tok/s | packed tok/s | ratio | cached tok/s | ratio | held: nn.Linear | packed | cached |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dt, b, r_ref, ms_ref, r_p, ms_p, r_c, ms_c, m_ref, m_p, m_c, _, _ in rows:
        lines.append(
            f"| {dt} | {b} | {r_ref:,.0f} ({ms_ref:.2f} ms) | {r_p:,.0f} ({ms_p:.2f} ms) | {r_p / r_ref:.3f} | "
            f"{r_c:,.0f} ({ms_c:.2f} ms) | {r_c / r_ref:.2f} | {mib(m_ref)} | {mib(m_p)} ({m_p / m_ref:.0%}) | "
            f"{mib(m_c)} ({m_c / m_ref:.0%}) |"
        )
    builds = ", ".join(f"{r[0]}: build {1e3 * r[11]:.0f} ms, dequantize {1e3 * r[12]:.0f} ms"
                       for r in rows if r[1] == 1)
    lines += [
        "",
        f"One layer, once: packing the codes when the layer is built and one full dequantization ({builds}).",
        "",
        ("Unpacking the whole layer's codes (4-bit), as each packed forward does: "
         + ", ".join(f"{k} {v:.1f} ms" for k, v in unpack_ms.items())
         + "; the CPU path uses the core's."),
        "",
        ("Packed (the default of `fq.load`) holds the int32 words (4 bits a code), float32 scales, int32 "
         "zeros and g_idx, and dequantizes the weight on every forward (the core unpacks, then "
         "`scale * (code - zero)` in float32, cast, a chunk of rows at a time), then one `F.linear`: "
         "the price of not having a fused int4 CPU kernel. Cached (`fq.load(dir, "
         "cache_dequantized=True)`) keeps the dequantized weight after the first forward: nn.Linear's "
         "speed, with the float weight's memory on top of the codes."),
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
