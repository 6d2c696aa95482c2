"""Ragged calibration rows against equal windows, ferroquant against llm-compressor: what do a
dataset's natural row lengths cost, in time and in quality? stories260K, W4 per channel.

    python benches/bench_ragged.py [--num-samples 64] [--seq-len 256] [--repeat 2]

Calibration (the same token ids for every tool): C4 rows truncated at ``--seq-len`` (the rows
of at least half that length, in file order; some are shorter: ragged), and as many equal
windows of ``--seq-len`` tokens cut from the same tokenized stream. Rows:

- ferroquant, its default path (samples stacked into one batch; ragged rows padded to the
  longest with the attention mask, pad positions kept out of the Hessians), and the ragged rows
  forced sample by sample (the path ragged input took before they were padded into a batch);
- llm-compressor's ``GPTQModifier`` through ``oneshot`` with its default ``batch_size=1`` (one
  row per forward, no padding), and with the whole set as one batch (equal windows as they are;
  ragged rows with its ``"padding"`` collator: padded to the longest, pad positions in its
  Hessians). ``--llmc-batch 0`` leaves the one-batch rows out.

Each timed run is a fresh worker process that loads the model, quantizes it (timed: the
quantization call only) and measures perplexity on held-out TinyStories text (all
``--eval-seq-len``-token windows, the same for every row). The table keeps the lower of
``--repeat`` timings, the repeats taken in rounds over all rows so that load drift on a shared
machine touches every row alike. Settings are those of ``bench_e2e.py`` for both tools
(symmetric minmax, actorder static, dampening 0.01, block 128, every decoder Linear, lm_head
float). llm-compressor runs in its own virtual environment (``setup_llmcompressor_env.sh``);
without it its rows are skipped with a note. Writes ``benches/results/ragged-stories260K.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # puts ferroquant's python/ on sys.path too

MODEL = "stories260K"
SCHEME = e2e.SCHEMES[MODEL]["W4 per-channel"]


def cases(n: int, llmc_batch: int) -> list[dict[str, Any]]:
    """The table's rows: tool, calibration rows, how they are run, and which row each one's
    time is compared with (same tool on equal windows; llm-compressor batch 1, same rows)."""
    out = [{"name": "float", "tool": "float", "rows": None, "path": "-"}]
    for rows in ("equal", "ragged"):
        out.append({"name": f"ferroquant {rows}", "tool": "ferroquant", "rows": rows,
                    "batched": None, "path": "default"})
    out.append({"name": "ferroquant ragged per-sample", "tool": "ferroquant", "rows": "ragged",
                "batched": False, "path": "forced"})
    for rows in ("equal", "ragged"):
        out.append({"name": f"llmcompressor {rows}", "tool": "llmcompressor", "rows": rows,
                    "batch_size": 1, "collator": "truncation",
                    "path": "default: batch_size=1, one row per forward"})
    if llmc_batch > 1:
        out.append({"name": "llmcompressor equal batched", "tool": "llmcompressor",
                    "rows": "equal", "batch_size": llmc_batch, "collator": "truncation",
                    "path": f"batch_size={llmc_batch}"})
        out.append({"name": "llmcompressor ragged batched", "tool": "llmcompressor",
                    "rows": "ragged", "batch_size": llmc_batch, "collator": "padding",
                    "path": f"batch_size={llmc_batch}, padding collator"})
    for c in out:
        if c["tool"] != "float":
            c["equal_ref"] = c["name"].replace("ragged", "equal").replace(" per-sample", "")
            c["llmc_ref"] = f"llmcompressor {c['rows']}"
    return out


# ---------------------------------------------------------------------------------------------
# inputs


def calibration_rows(tok: Any, num_samples: int, seq_len: int) -> dict[str, list[list[int]]]:
    """{"ragged": C4 rows truncated at seq_len (rows of at least seq_len // 2 tokens, in file
    order), "equal": num_samples windows of seq_len tokens from the same tokenized stream}."""
    rows: list[list[int]] = []
    stream: list[int] = []
    with open(e2e.shared_data() / "text" / "c4_calibration.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            stream += ids
            if len(rows) < num_samples and len(ids) >= seq_len // 2:
                rows.append(ids[:seq_len])
            if len(rows) >= num_samples and len(stream) >= num_samples * seq_len:
                break
    if len(rows) < num_samples or len(stream) < num_samples * seq_len:
        raise SystemExit(f"bench_ragged: the C4 sample holds too few tokens for {num_samples} "
                         f"x {seq_len}")
    equal = [stream[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]
    return {"equal": equal, "ragged": rows}


# ---------------------------------------------------------------------------------------------
# worker


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.worker_cfg)
    model, tok = e2e.load(MODEL)
    rows = None
    if cfg["rows"]:
        rows = [torch.tensor(r) for r in json.loads(Path(cfg["rows_file"]).read_text())[cfg["rows"]]]
    load_before = os.getloadavg()[0]
    quant_s = 0.0
    if cfg["tool"] == "ferroquant":
        from ferroquant.calibration import from_tensors

        calib = from_tensors(rows)  # built before the clock starts; llm-compressor's the same
        t0 = time.perf_counter()
        e2e.run_ferroquant(model, SCHEME, calib, batched=cfg["batched"])
        quant_s = time.perf_counter() - t0
    elif cfg["tool"] == "llmcompressor":
        t0 = time.perf_counter()
        e2e.run_llmcompressor(model, tok, SCHEME, rows, batch_size=cfg["batch_size"],
                              data_collator=cfg["collator"])
        quant_s = time.perf_counter() - t0

    from ferroquant.eval import perplexity, tokenize_text

    text = (e2e.shared_data() / "text" / "tinystories_valid_30k.txt").read_text(encoding="utf-8")
    ids = tokenize_text(tok, text)
    ppl = perplexity(model, ids, seq_len=cfg["eval_seq_len"], progress=False)
    Path(args.worker_out).write_text(json.dumps({
        "ppl": ppl, "quant_s": quant_s, "loadavg": load_before,
        "eval_tokens": ids.numel(), "torch_threads": torch.get_num_threads(), **e2e.DETAILS}))


# ---------------------------------------------------------------------------------------------
# parent


def table(args: argparse.Namespace, rows: dict[str, list[list[int]]],
          results: dict[str, dict[str, Any]], skipped: str | None, llmc_py: str) -> str:
    n, L = args.num_samples, args.seq_len
    lens = [len(r) for r in rows["ragged"]]
    real = {k: sum(len(r) for r in v) for k, v in rows.items()}
    fl = results.get("float", {}).get("ppl")
    ev = next((r["eval_tokens"] for r in results.values() if "eval_tokens" in r), 0)
    loads = [r["loadavg"] for r in results.values() if "loadavg" in r]
    lines = [f"# Ragged calibration rows: ferroquant and llm-compressor, {MODEL} W4 per channel",
             "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {e2e.machine()}",
             (f"- torch threads per run: {args.threads or 'default'}; 1-minute load average "
              f"before the timed call: {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
              "over all runs (other jobs share this machine; compare ratios, not seconds)"),
             f"- ferroquant env: {e2e.versions(sys.executable)}",
             (f"- llm-compressor env: {e2e.versions(llmc_py)}" if not skipped
              else f"- llm-compressor: {skipped}"),
             (f"- calibration, the same token ids for both tools: {n} C4 rows truncated at {L} "
              f"tokens (ragged: {min(lens)}-{max(lens)} tokens, {sum(x < L for x in lens)} "
              f"shorter than {L}, {real['ragged']} tokens), and {n} x {L} equal windows cut "
              f"from the same tokenized C4 stream ({real['equal']} tokens)"),
             (f"- evaluation: TinyStories validation text (held out; no calibration token comes "
              f"from it), all {ev // args.eval_seq_len} non-overlapping {args.eval_seq_len}-token "
              "windows, the same for every row"),
             ("- both tools: symmetric 4-bit per output channel, minmax scales, actorder static, "
              "dampening 0.01, block 128, every decoder Linear quantized, lm_head and "
              "embeddings float"),
             ("- time: the quantization call only (model load and evaluation excluded), each "
              f"run a fresh process, lower of {args.repeat} runs taken in rounds over all rows"),
             ("- how llm-compressor takes ragged rows: a `datasets.Dataset` of `input_ids` / "
              "`attention_mask` lists of their own lengths; `oneshot` with its default "
              "`batch_size=1` runs them one sample per forward, unpadded (its length-aware "
              "sampler orders them longest first). With a larger batch its default "
              "`truncation` collator would cut every row of a batch to the shortest (dropping "
              "tokens), so the batched ragged row uses its `padding` collator: rows padded to "
              "the longest with the attention mask, and the pad positions' activations "
              "accumulated into the Hessians like real tokens"),
             ("- how ferroquant takes them: samples stacked into one batch, ragged rows padded "
              "to the longest with the attention mask, pad positions kept out of the Hessians"),
             ""]
    lines += [("| calibration | tool | path | tokens forwarded | perplexity | vs float | "
               "seconds | vs same tool, equal windows | llm-compressor (batch 1, same rows) / "
               "this |"),
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases(n, args.llmc_batch):
        r = results.get(c["name"])
        if r is None:
            continue
        label = {"equal": "equal windows", "ragged": "ragged rows", None: "-"}[c["rows"]]
        tool = {"float": "float (not quantized)", "ferroquant": "ferroquant",
                "llmcompressor": "llm-compressor"}[c["tool"]]
        path = c["path"]
        if r.get("block_paths"):
            path += f" ({', '.join(r['block_paths'])})"
        if "error" in r:
            lines.append(f"| {label} | {tool} | {path} | | failed: {r['error'][:80]} | | | | |")
            continue
        fwd = "-"
        if c["rows"]:
            fwd = str(real[c["rows"]])
            if c.get("batch_size", 0) > 1 or (c["tool"] == "ferroquant" and c["batched"] is None
                                              and "batched" in r.get("block_paths", [])):
                fwd = str(n * max(len(x) for x in rows[c["rows"]]))
        rel = f"{100 * (r['ppl'] / fl - 1):+.2f}%" if fl else ""
        secs = "-" if c["tool"] == "float" else f"{r['quant_s']:.2f}"
        eq = ratio(r, results.get(c.get("equal_ref", "")))
        llmc = ratio(results.get(c.get("llmc_ref", "")), r)
        lines.append(f"| {label} | {tool} | {path} | {fwd} | {r['ppl']:.4f} | {rel} | {secs} | "
                     f"{eq} | {llmc} |")
    lines += ["", ("Tokens forwarded: the positions each block runs over (padding included); "
                   "the Hessians see the real tokens only, except in llm-compressor's padded "
                   "batch. \"vs same tool, equal windows\": this row's time over the time of the same "
                   "tool, run the same way, on the equal windows (the forced sample-by-sample "
                   "row: over ferroquant's default path on the equal windows)."), ""]
    if skipped:
        lines.append(f"llm-compressor rows skipped: {skipped}.")
    lines += [f"- note: {x}" for x in args.note or []]
    return "\n".join(lines) + "\n"


def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    """num's time / den's time, or '' when either is missing."""
    if not num or not den or "quant_s" not in num or not den.get("quant_s"):
        return ""
    return f"{num['quant_s'] / den['quant_s']:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker "
                    "(default 1; 0: torch's default)")
    ap.add_argument("--llmc-python", default=None,
                    help="interpreter with llmcompressor installed (default "
                         "$FERROQUANT_LLMC_PYTHON or ~/.cache/ferroquant/bench-venv)")
    ap.add_argument("--llmc-batch", type=int, default=None,
                    help="llm-compressor's batch for its one-batch rows (default: all samples; "
                         "0 or 1: leave those rows out)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    ap.add_argument("--out", default=None, help="markdown file (default benches/results/...)")
    ap.add_argument("--note", action="append", default=None,
                    help="a line added to the results file (repeatable)")
    ap.add_argument("--worker-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_cfg:
        worker(args)
        return 0
    if args.threads is None:
        args.threads = 1
    if args.llmc_batch is None:
        args.llmc_batch = args.num_samples

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(e2e.shared_data() / "models" / MODEL)
    rows = calibration_rows(tok, args.num_samples, args.seq_len)
    llmc_py = e2e.python_for("llmcompressor", args)
    skipped = None
    if not Path(llmc_py).exists():
        skipped = (f"no llm-compressor interpreter at {llmc_py} (run "
                   "benches/setup_llmcompressor_env.sh or pass --llmc-python)")
        print(f"bench_ragged: {skipped}; its rows are skipped")
    todo = [c for c in cases(args.num_samples, args.llmc_batch)
            if not (skipped and c["tool"] == "llmcompressor")
            and (args.only is None or c["name"] in args.only)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        for rnd in range(args.repeat):
            for c in todo:
                if c["tool"] == "float" and rnd:  # nothing timed: one run is enough
                    continue
                wcfg = {**c, "rows_file": str(rows_file), "eval_seq_len": args.eval_seq_len}
                py = llmc_py if c["tool"] == "llmcompressor" else sys.executable
                print(f"  round {rnd + 1}  {c['name']:<30}", end="", flush=True)
                r = e2e.run_worker(py, __file__, wcfg, args.threads)
                if "error" in r:
                    print(f"FAILED\n{r.pop('tail')}")
                    results.setdefault(c["name"], r)
                    continue
                print(f"ppl {r['ppl']:.4f}  quantize {r['quant_s']:.2f} s  "
                      f"(load avg {r['loadavg']:.1f})")
                best = results.get(c["name"])
                if best and "ppl" in best and abs(best["ppl"] - r["ppl"]) > 1e-6 * r["ppl"]:
                    print(f"  note: perplexity differs between runs ({best['ppl']:.6f})")
                if best is None or "error" in best or r["quant_s"] < best["quant_s"]:
                    results[c["name"]] = r
    md = table(args, rows, results, skipped, llmc_py)
    out = Path(args.out) if args.out else e2e.REPO / "benches" / "results" / f"ragged-{MODEL}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    print()
    print(md)
    print(f"written to {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
