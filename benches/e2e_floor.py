"""The least time any one-pass GPTQ can take on SmolLM2 on this machine, next to ferroquant's.

GPTQ over a model must at least run every decoder block forward over the calibration tokens
once (ferroquant's one-pass path does exactly that) and accumulate each distinct layer input's
Hessian ``X^T X``. This script times those two floors with nothing else around them:

- forward: each of SmolLM2's 30 decoder blocks called once on the 64 x 512 calibration batch
  stacked, under ``torch.no_grad``, no hooks (hidden states are random: the cost does not depend
  on the values), in float32 and in bf16;
- Hessians: ferroquant's accumulator on inputs of each distinct width and count a block feeds
  (q/k/v share one, o_proj, gate/up share one, down_proj), with the same tokens, from float32
  and from bf16 rows;

and prints them next to ferroquant's measured phases and llm-compressor's time from
``benches/results/e2e-smollm2.json`` (W4 g64, draw 0). Writes ``e2e-smollm2-floor.md``.

    python benches/e2e_floor.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "benches"))

import bench_e2e
import torch
from ferroquant import solver

RESULTS = REPO / "benches" / "results"


def forward_seconds(model, n: int, seq: int, dtype: torch.dtype) -> float:
    """One call of every decoder block on ``n`` stacked sequences of ``seq`` tokens."""
    inner = model.model
    hidden = torch.randn(n, seq, model.config.hidden_size, dtype=dtype)
    pos = torch.arange(seq).unsqueeze(0)
    rope = tuple(t.to(dtype) for t in inner.rotary_emb(hidden, pos))
    total = 0.0
    with torch.no_grad():
        warm = inner.layers[0].to(dtype)  # first-call costs (allocator, kernels) off the clock
        warm(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
        for block in inner.layers:
            blk = block.to(dtype)
            t0 = time.perf_counter()
            blk(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
            total += time.perf_counter() - t0
            block.to(torch.float32)
    return total


def hessian_seconds(model, n: int, seq: int, dtype: torch.dtype) -> float:
    """Hessians of one block's distinct inputs (widths from the config), times the block count."""
    cfg = model.config
    widths = [cfg.hidden_size, cfg.hidden_size, cfg.hidden_size, cfg.intermediate_size]
    total = 0.0
    for w in widths:
        x = torch.randn(n * seq, w).to(dtype)
        acc = solver.HessianAccumulator(w)
        t0 = time.perf_counter()
        for part in x.split(seq):  # per sample, as the pipeline adds them
            acc.add_batch(part)
        total += time.perf_counter() - t0
    return total * cfg.num_hidden_layers


def main() -> int:
    threads = int(os.environ.get("FERROQUANT_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    model, _ = bench_e2e.load("smollm2")
    model.eval()
    cfg = bench_e2e.DEFAULTS["smollm2"]
    n, seq = cfg["num_samples"], cfg["seq_len"]
    measured = json.loads((RESULTS / "e2e-smollm2.json").read_text())["runs"]["W4 g64"]
    llmc = measured["llmcompressor"]["quant_s"]
    same = {"float32": llmc, "bf16": measured["llmcompressor-bf16"]["quant_s"]}
    load0 = os.getloadavg()[0]
    rows = []
    for label, dtype, method in (("float32", torch.float32, "ferroquant"),
                                 ("bf16", torch.bfloat16, "ferroquant-bf16")):
        # the least of two runs: a floor should not carry the shared machine's noise
        fwd = min(forward_seconds(model, n, seq, dtype) for _ in range(2))
        hes = min(hessian_seconds(model, n, seq, dtype) for _ in range(2))
        got = measured[method]
        ph = got["phases"]
        rows.append((label, fwd, hes, got, ph))
        print(f"{label}: forward {fwd:.1f} s, hessians {hes:.1f} s (ferroquant: forward "
              f"{ph['forward']:.1f}, hessian {ph['hessian']:.1f}, total {got['quant_s']:.1f})",
              flush=True)
    lines = [
        "# The floor under one-pass GPTQ on SmolLM2 (W4 g64, 64 x 512 C4 tokens)", "",
        (f"- machine: {bench_e2e.machine()}; torch threads {threads}; 1-minute load average "
        f"{load0:.1f} before, {os.getloadavg()[0]:.1f} after"),
        ("- floor: every decoder block called once on the stacked calibration batch (no hooks), "
        "plus the Hessians of each block's distinct Linear inputs with ferroquant's kernel; "
        "each the least of two runs"),
        "- ferroquant and llm-compressor: the measured rows of `e2e-smollm2.md` (draw 0)",
        (f"- llm-compressor: {llmc:.1f} s with its float32 forward (a third: {llmc / 3:.1f} s), "
        f"{same['bf16']:.1f} s on the model cast to bf16"),
        "",
        ("| forward dtype | block forwards | Hessians | floor | ferroquant forward | "
        "ferroquant Hessians | ferroquant solves | ferroquant total | llm-compressor / floor | "
        "llm-compressor in this dtype / floor |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, fwd, hes, got, ph in rows:
        floor = fwd + hes
        lines.append(f"| {label} | {fwd:.1f} | {hes:.1f} | {floor:.1f} | {ph['forward']:.1f} | "
                     f"{ph['hessian']:.1f} | {ph['solve']:.1f} | {got['quant_s']:.1f} | "
                     f"{llmc / floor:.2f}x | {same[label] / floor:.2f}x |")
    lines += ["", ("The last two columns are the largest speed-ups over llm-compressor that any "
              "implementation running one forward per block in that dtype plus these Hessians "
              "could reach on this machine, before solving a single layer.")]
    md = "\n".join(lines) + "\n"
    (RESULTS / "e2e-smollm2-floor.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
