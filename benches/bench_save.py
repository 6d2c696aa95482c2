"""Peak memory of ``ferroquant.save`` against the checkpoint's size.

A randomly initialised Llama-shaped float32 model (a few hundred MB) gets random 4-bit codes
on every decoder Linear (group 128; the codes do not matter for memory) and is saved as GPTQ.
Each measurement runs in a fresh subprocess: after the inputs are built, the process's peak RSS
is reset (``/proc/self/clear_refs``) and ``VmHWM - VmRSS`` after the call is the memory the
call added at its peak. Rows:

- ``fq.save(model)``: everything ``save`` does (pack the layers, write), default shard size and
  a small one;
- ferroquant's writer and ``safetensors.torch.save_file`` (the plain reference) given the same,
  already built, tensors (the packed layers plus the model's other tensors).

Writes benches/results/save-memory.md.

    python benches/bench_save.py [--hidden 1024] [--layers 8] [--vocab 32000]
        [--baseline-python DIR]   # also run fq.save from another ferroquant python/ tree
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("save", "save-sharded", "writer", "reference")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def build_model(hidden: int, layers: int, vocab: int):
    import torch
    from ferroquant.config import QuantizationArgs
    from ferroquant.quantized import ATTR, QuantizedWeight
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    args = QuantizationArgs(num_bits=4, group_size=128)
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            out_f, in_f = m.weight.shape
            ng = in_f // 128
            q = QuantizedWeight(
                torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
                torch.rand(out_f, ng, generator=g) * 0.01 + 1e-3,
                torch.full((out_f, ng), 8, dtype=torch.int32),
                torch.arange(in_f, dtype=torch.int32) // 128,
                args,
            )
            setattr(m, ATTR, q)
    return model


def child(mode: str, a: argparse.Namespace, out: Path) -> dict:
    import gc

    import ferroquant as fq
    import torch

    model = build_model(a.hidden, a.layers, a.vocab)
    tensors = None
    if mode in ("writer", "reference"):
        # The same tensors fq.save writes: build them once, outside the measured call.
        from ferroquant.formats import _dedupe_shared, _layer_from_module, gptq
        from ferroquant.quantized import ATTR

        tensors = {}
        prefixes = []
        for name, m in model.named_modules():
            q = getattr(m, ATTR, None)
            if q is not None:
                tensors.update(gptq.layer_tensors(name, _layer_from_module(name, m, q), 1))
                prefixes.append(name + ".")
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(prefixes))}
        tensors.update({k: v.detach().contiguous() for k, v in _dedupe_shared(sd).items()})
        for name, m in model.named_modules():
            if getattr(m, ATTR, None) is not None:
                delattr(m, ATTR)
        del model
        model = None
    gc.collect()
    if not reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "save":
        fq.save(model, out, format="gptq")
    elif mode == "save-sharded":
        fq.save(model, out, format="gptq", max_shard_size=a.shard)
    elif mode == "writer":
        from ferroquant import solver

        solver.write_safetensors(out, tensors, metadata={"format": "pt"})
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    files = [p for p in out.iterdir() if p.name.endswith(".safetensors")]
    return {
        "mode": mode,
        "rss_before_mib": before / 1024,
        "peak_extra_mib": (peak - before) / 1024,
        "checkpoint_mib": sum(p.stat().st_size for p in files) / 2**20,
        "files": len(files),
        "seconds": seconds,
        "torch": torch.__version__,
    }


def run(mode: str, a: argparse.Namespace, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", mode, "--out-dir", str(Path(tmp) / "ckpt"),
               "--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab), "--shard", a.shard]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard", default="16MB", help="max_shard_size of the sharded save")
    ap.add_argument("--baseline-python", default=None,
                    help="a ferroquant python/ tree (with its _core) whose fq.save to measure as well")
    ap.add_argument("--child", choices=MODES, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "save-memory.md"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a, Path(a.out_dir))))
        return

    rows = []
    for mode in MODES:
        r = run(mode, a, None)
        rows.append(("this tree", r))
        print(json.dumps(r))
    if a.baseline_python:
        for mode in ("save", "save-sharded"):
            r = run(mode, a, a.baseline_python)
            rows.append(("baseline tree (`--baseline-python`)", r))
            print("baseline", json.dumps(r))

    labels = {
        "save": "`fq.save(model)` (default `max_shard_size`)",
        "save-sharded": f"`fq.save(model, max_shard_size={a.shard!r})`",
        "writer": "ferroquant writer (`solver.write_safetensors`) on the built tensors",
        "reference": "`safetensors.torch.save_file` on the same tensors",
    }
    r0 = rows[0][1]
    lines = [
        "# Peak memory of saving a checkpoint",
        "",
        (f"Random Llama-shaped float32 model (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, untied "
         f"head), random int4 codes on every decoder Linear (group 128), saved as GPTQ: a "
         f"{r0['checkpoint_mib']:.0f} MiB checkpoint. Each row is a fresh process; *peak extra* is "
         "VmHWM minus VmRSS around the call (peak reset just before it), i.e. the memory the call "
         f"added at its peak. torch {r0['torch']}. Command: `python benches/bench_save.py`."),
        "",
        "| what | code run | files | checkpoint | RSS before | peak extra | extra / checkpoint | time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for code, r in rows:
        lines.append(
            f"| {labels[r['mode']]} | {code} | {r['files']} | {r['checkpoint_mib']:.0f} MiB | "
            f"{r['rss_before_mib']:.0f} MiB | {r['peak_extra_mib']:.0f} MiB | "
            f"{r['peak_extra_mib'] / r['checkpoint_mib']:.2f} | {r['seconds']:.1f} s |"
        )
    lines += [
        "",
        ("`fq.save` hands the writer a generator: each layer is packed only when its shard is "
         "gathered, the writer borrows every buffer (no copy of the tensor bytes, like `save_file`, "
         "which writes from the tensors' pointers too) and writes a shard as soon as it is complete, "
         "then releases it. What `save` adds at its peak is therefore the packed layers of the shard "
         "being gathered: with the default 2GB shards all of them, with small shards only a few. "
         "The baseline rows (when measured) are the previous writer, which copied every tensor's "
         "bytes into Rust-owned buffers after packing every layer up front."),
        "",
    ]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
