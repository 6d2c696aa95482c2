"""Ragged calibration rows against equal windows: does a dataset's natural row lengths cost
more than fixed windows? stories260K, C4 rows truncated at ``--seq-len`` (some shorter: ragged)
against the same number of equal windows, and the ragged rows forced sample by sample (the
path ragged input took before samples were padded into one batch).

    python benches/bench_ragged.py [--num-samples 64] [--seq-len 256] [--repeat 2]

Each row is the lower of ``--repeat`` timings of ``ferroquant.quantize`` (W4 per channel).
Writes ``benches/results/ragged-stories260K.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import ferroquant as fq
import torch
from ferroquant.calibration import from_tensors
from ferroquant.models import shared_data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = shared_data_root()
    path = data / "models" / "stories260K"
    tok = AutoTokenizer.from_pretrained(path)
    rows, stream = [], []
    with open(data / "text" / "c4_calibration.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            stream += ids
            if len(rows) < args.num_samples and len(ids) >= args.seq_len // 2:
                rows.append(torch.tensor(ids[:args.seq_len]))
            if len(rows) >= args.num_samples and len(stream) >= args.num_samples * args.seq_len:
                break
    n = args.num_samples
    equal = torch.tensor(stream[:n * args.seq_len]).view(n, args.seq_len)
    ragged = from_tensors(rows)
    cases = [("equal windows", from_tensors(equal), None),
             ("ragged rows", ragged, None),
             ("ragged rows, sample by sample", ragged, False)]
    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    for name, calib, batched in cases:
        best, rep = float("inf"), None
        for _ in range(args.repeat):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            rep = fq.quantize(model, {"group_size": -1}, calib, show_progress=False,
                              batched=batched)
            best = min(best, time.perf_counter() - t0)
        out.append((name, calib.num_tokens, best, rep.block_paths[0].split(" (")[0]))
    base = out[0][2]
    lines = [(f"# Ragged calibration rows, stories260K W4 per channel ({n} samples, seq_len "
             f"{args.seq_len})"), "",
             (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"load average {os.getloadavg()[0]:.2f}. Lower of {args.repeat} runs."), "",
             "| calibration | tokens | path | seconds | vs equal windows | per 1k tokens |",
             "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {a} | {t} | {p} | {s:.2f} | {s / base:.2f}x | {1000 * s / t:.3f} s |"
              for a, t, s, p in out]
    lines += ["", (f"Ragged rows: lengths {min(len(r) for r in rows)}-{max(len(r) for r in rows)}"
              " tokens, padded to the longest in one batch; pad positions reach no Hessian.")]
    text = "\n".join(lines) + "\n"
    print(text)
    dest = REPO / "benches" / "results" / "ragged-stories260K.md"
    dest.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
