"""What rounding scales to their storage dtype inside the solve does to quality.

Before, the solver chose codes against float32 scales and the GPTQ checkpoint stored them as
float16, so the loaded model was not the solved one. Now scales are rounded to the storage
dtype before codes are chosen. Three perplexities on the same calibration and evaluation
windows (bench_e2e's inputs; SmolLM2's weights sit on a Q4_1 grid, see its README note):

- solved, float32 scales: the in-memory model the old pipeline produced;
- old checkpoint: the same codes with the scales rounded to float16 afterwards, which is what
  the old GPTQ checkpoint held and every loader used;
- new (storage dtype in the solve): the in-memory model, equal to its loaded checkpoint.

    python benches/scale_storage.py --model smollm2 [--max-windows 8]
Writes ``benches/results/scale-storage-<model>.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO.parent / "python"))

import bench_e2e as e2e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["stories260K", "smollm2"], default="smollm2")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=None)
    args = ap.parse_args()
    import ferroquant as fq
    import torch
    from ferroquant.eval import perplexity
    from ferroquant.quantized import ATTR

    cfg = dict(e2e.DEFAULTS[args.model])
    if args.max_windows:
        cfg["max_windows"] = args.max_windows
    gs = args.group_size or (64 if args.model == "smollm2" else 32)
    # stories260K: GPTQ's layout cannot hold the 172-wide MLP; keep it float there
    ignore = ["lm_head"] + ([r"re:.*\.mlp\."] if args.model == "stories260K" else [])
    torch.set_num_threads(os.cpu_count() or 1)
    base, tok = e2e.load(args.model)
    calib, eval_ids, desc = e2e.inputs(args.model, tok, cfg)
    recipe = {"scheme": f"W{args.bits}A16", "group_size": gs, "ignore": ignore}

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, eval_ids, seq_len=cfg["eval_seq_len"],
                          max_windows=cfg["max_windows"], progress=False)

    old = copy.deepcopy(base)
    fq.quantize(old, recipe, calib, show_progress=False)  # float32 scales (no format named)
    p_solved = ppl(old)
    for m in old.modules():  # what the old float16 checkpoint held
        q = getattr(m, ATTR, None)
        if q is not None:
            q.scales = q.scales.half().float()
            m.weight.data.copy_(q.dequantize(m.weight.dtype).reshape(m.weight.shape))
    p_ckpt = ppl(old)
    del old
    new = copy.deepcopy(base)
    fq.quantize(new, recipe, calib, show_progress=False, format="gptq")
    p_new = ppl(new)
    rows = [("solved, float32 scales (old in-memory model)", p_solved),
            ("old GPTQ checkpoint (same codes, scales rounded to float16 afterwards)", p_ckpt),
            ("new: float16 scales inside the solve (in memory = checkpoint)", p_new)]
    lines = [f"# Scale storage dtype and quality: {args.model} W{args.bits} g{gs}, GPTQ format",
             "", f"- inputs: {desc}",
             f"- evaluation: {cfg['eval_seq_len']}-token windows"
             + (f", first {cfg['max_windows']}" if cfg["max_windows"] else ", all"),
             f"- ignore: {ignore}", "",
             "| model | perplexity |", "|---|---:|"]
    lines += [f"| {a} | {p:.4f} |" for a, p in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "results" / f"scale-storage-{args.model}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
