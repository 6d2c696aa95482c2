"""Static activation observers: ferroquant's Rust observers against plain torch doing the same
statistics, on activation-sized batches. What is timed is folding one calibration sample's
activations ``[tokens, features]`` into a per-tensor observer (what a static input scale costs
per sample and layer), the tensor already in memory.

    python benches/bench_observers.py [--tokens 512] [--features 576 1536] [--repeat 20]

Rows per observer and width:

- ``minmax`` (llm-compressor's moving average of each batch's range) and ``static_minmax``
  (absolute range): ferroquant's ``Observer.update`` against ``torch.aminmax`` plus the
  running update in torch;
- ``mse`` (shrink grid of 80 candidate ranges scored by the error they cause, norm 2.4, as
  llm-compressor's ``mse`` observer scores them): ferroquant's one pass over the batch against
  a torch loop of fake quantizations, one per candidate.

Both sides run in this process, on the same tensors, torch with its default threads; the table
gives the median of ``--repeat`` runs and the ratio torch / ferroquant. Writes
``benches/results/observers-cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import torch
from ferroquant.observers import Observer


def _median_seconds(fn, repeat: int) -> float:
    for _ in range(3):  # warm-up (first calls pay for allocations and dispatch)
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class _TorchMinMax:
    def __init__(self, moving: bool, c: float = 0.01) -> None:
        self.moving, self.c, self.lo, self.hi = moving, c, None, None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.moving:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class _TorchMse:
    """The shrink-grid search in torch: each candidate range fake-quantizes the batch."""

    def __init__(self, grid: int = 100, maxshrink: float = 0.2, norm: float = 2.4) -> None:
        self.p = [1 - i / grid for i in range(int(maxshrink * grid))]
        self.norm, self.err, self.lo, self.hi = norm, None, None, None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        amax = torch.maximum(self.lo.abs(), self.hi.abs())
        errs = []
        for p in self.p:
            s = amax * p / 127.5
            q = (x / s).round().clamp(-128, 127) * s
            errs.append((q - x).abs().pow(self.norm).sum())
        e = torch.stack(errs)
        self.err = e if self.err is None else self.err + e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--features", type=int, nargs="*", default=[576, 1536])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benches/results/observers-cpu.md"))
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    for f in a.features:
        x = torch.randn(a.tokens, f, generator=g) * torch.linspace(0.1, 3.0, f)
        for name, torch_obs in (("static_minmax", lambda: _TorchMinMax(False)),
                                ("minmax", lambda: _TorchMinMax(True)),
                                ("mse", lambda: _TorchMse())):
            core = "moving_average_minmax" if name == "minmax" else name
            ours = Observer(f, core, strategy="tensor")
            ref = torch_obs()
            t_ours = _median_seconds(lambda o=ours, x=x: o.update(x), a.repeat)
            t_ref = _median_seconds(lambda r=ref, x=x: r.update(x), a.repeat)
            rows.append((name, f, t_ours, t_ref))
            print(f"{name:14s} {a.tokens}x{f}: ferroquant {t_ours * 1e3:.3f} ms, "
                  f"torch {t_ref * 1e3:.3f} ms, {t_ref / t_ours:.2f}x", flush=True)
    load = os.getloadavg()[0]
    lines = [
        "# Static activation observers (CPU)", "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        (f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical "
         f"cores, torch {torch.__version__} with {torch.get_num_threads()} threads, 1-minute "
         f"load average {load:.1f} at the end (other jobs share this machine)"),
        (f"- one update of a per-tensor int8 observer with a [{a.tokens}, features] float32 "
         f"batch (one calibration sample's activations of one layer); median of {a.repeat}"),
        ("- ferroquant: the Rust observer through its Python wrapper (a numpy view, no copy); "
         "torch: the same statistic written in torch (the mse row: one fake quantization per "
         "candidate range, as llm-compressor's mse observer does it)"), "",
        "| observer | features | ferroquant (ms) | torch (ms) | torch / ferroquant |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {f} | {o * 1e3:.3f} | {r * 1e3:.3f} | {r / o:.2f}x |"
              for n, f, o, r in rows]
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
