"""GPU benchmark of the CUDA path (issue 5), one run, results in ``benches/results/gpu-<date>.md``.

1. Per-layer GPTQ solve (W4, symmetric, group 128, min-max) at 4096x4096, 4096x14336 and
   14336x4096 (out x in): ``ferroquant.cuda.gptq_quantize`` vs a plain torch fp32
   re-implementation of the reference algorithm on the same GPU (same Hessian, same weight);
   times, speedup (target >= 10x) and both proxy losses.
2. Hessian accumulation from bf16 activations (128 x 2048 tokens at n = 4096 and 14336, fed in
   2048-token batches like the forward hooks do) as a fraction of the bf16 GEMM rate measured in
   the same run (target >= 70%).
3. End to end (``--e2e``): a randomly initialised model of Llama-3-8B's shapes in bf16, 128 x
   2048 random calibration tokens, W4A16 group 128: ferroquant vs llm-compressor's GPTQModifier
   (if installed) on the same GPU; wall time (target >= 3x faster and < 2 minutes) and peak GPU
   memory of both.

    python benches/gpu_bench.py                 # 1 + 2
    python benches/gpu_bench.py --e2e           # 1 + 2 + 3
    python benches/gpu_bench.py --cpu-smoke     # the script's logic at tiny sizes, no GPU needed

Exits with status 2 and the reason when CUDA is not usable.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
# the torch re-implementation of the reference algorithm the CPU tests and benches use too
sys.path.insert(0, str(ROOT / "tests"))

LAYER_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per Hessian batch")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best of)")
    p.add_argument("--skip-reference", action="store_true", help="no torch reference solve")
    p.add_argument("--e2e", action="store_true", help="also the Llama-3-8B-shaped end to end")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (checks the script)")
    p.add_argument("--out", type=Path, default=None, help="markdown output path")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# timing and the torch reference
# --------------------------------------------------------------------------------------------


def sync(dev: object) -> None:
    import torch

    if getattr(dev, "type", "cpu") == "cuda":
        torch.cuda.synchronize(dev)  # type: ignore[arg-type]


def best_of(reps: int, dev: object, fn: Callable[[], object]) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best, out


def activations(tokens: int, n: int, dev, dtype, seed: int):  # type: ignore[no-untyped-def]
    """Correlated activations ``z @ A`` (a random low-rank-ish mix plus per-feature scales)."""
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    k = min(n, 512)
    a = torch.randn(k, n, generator=g, device=dev) / math.sqrt(k)
    a *= torch.exp(0.5 * torch.randn(n, generator=g, device=dev))
    out = torch.empty(tokens, n, device=dev, dtype=dtype)
    for t0 in range(0, tokens, 8192):
        t1 = min(tokens, t0 + 8192)
        z = torch.randn(t1 - t0, k, generator=g, device=dev)
        out[t0:t1] = (z @ a).to(dtype)
    return out


def gemm_tflops(dev, dtype, n: int = 8192, reps: int = 5) -> float:  # type: ignore[no-untyped-def]
    import torch

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t, _ = best_of(reps, dev, lambda: a @ b)
    return 2 * n**3 / t / 1e12


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def layer_section(args: argparse.Namespace, dev, backend, shapes) -> list[str]:  # type: ignore[no-untyped-def]
    import torch
    from reference_gptq import GridSpec, gptq_reference, proxy_loss

    lines = [
        "## Per-layer solve (W4 sym, group 128, min-max)",
        "",
        "| out x in | ferroquant s | torch reference s | speedup | loss fq | loss ref | rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows, cols in shapes:
        x = activations(min(args.tokens, 4 * cols), cols, dev, torch.bfloat16, seed=cols)
        acc = backend.HessianAccumulator(cols, **({"device": dev} if dev.type == "cuda" else {}))
        for t0 in range(0, x.shape[0], args.batch_tokens):
            acc.add_batch(x[t0 : t0 + args.batch_tokens])
        h = acc.hessian()
        del x
        g = torch.Generator(device=dev).manual_seed(rows)
        w = 0.02 * torch.randn(rows, cols, generator=g, device=dev)
        solve = functools.partial(backend.gptq_quantize, w, h, group_size=128)
        solve()  # warm-up (NVRTC compile, handles)
        t_fq, res = best_of(args.reps, dev, solve)
        loss_fq = proxy_loss(w, res.dequantized, h)
        if args.skip_reference:
            t_ref, loss_ref = math.nan, math.nan
        else:
            ref = functools.partial(gptq_reference, w, h, GridSpec(bits=4), group_size=128,
                                    dtype=torch.float32)
            t_ref, r_ref = best_of(1, dev, ref)
            loss_ref = proxy_loss(w, r_ref.dequantized, h)
        rel = abs(loss_fq - loss_ref) / loss_ref if not math.isnan(loss_ref) else math.nan
        lines.append(
            f"| {rows}x{cols} | {t_fq:.3f} | {t_ref:.3f} | {t_ref / t_fq:.1f}x | {loss_fq:.4g} "
            f"| {loss_ref:.4g} | {rel:.2e} |"
        )
        print(lines[-1], flush=True)
        del h, w, res, solve
    return lines + [""]


def hessian_section(args: argparse.Namespace, dev, backend, sizes, gemm) -> list[str]:  # type: ignore[no-untyped-def]
    import torch

    lines = [
        f"## Hessian accumulation ({args.tokens} bf16 tokens, batches of {args.batch_tokens})",
        "",
        f"Measured bf16 GEMM rate (8192^3 matmul): **{gemm:.1f} TFLOP/s**.",
        "",
        "| n | seconds | TFLOP/s (2·tokens·n²) | fraction of GEMM rate |",
        "|---|---|---|---|",
    ]
    for n in sizes:
        x = activations(args.tokens, n, dev, torch.bfloat16, seed=n)
        kw = {"device": dev} if dev.type == "cuda" else {}

        def run(x=x, n=n, kw=kw):  # type: ignore[no-untyped-def]
            acc = backend.HessianAccumulator(n, **kw)
            for t0 in range(0, x.shape[0], args.batch_tokens):
                acc.add_batch(x[t0 : t0 + args.batch_tokens])
            return acc

        run()
        t, _ = best_of(args.reps, dev, run)
        rate = 2 * args.tokens * n * n / t / 1e12
        lines.append(f"| {n} | {t:.3f} | {rate:.1f} | {rate / gemm:.0%} |")
        print(lines[-1], flush=True)
        del x
    return lines + [""]


def e2e_section(args: argparse.Namespace, dev) -> list[str]:  # type: ignore[no-untyped-def]
    import torch

    lines = ["## End to end: Llama-3-8B shapes, random bf16 weights, 128 x 2048 tokens", ""]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return lines + [f"skipped: transformers missing ({e})", ""]
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (128, 2048), generator=g)

    def fresh():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        with torch.device(dev):
            return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()

    rows = ["| method | wall s | peak GPU GiB |", "|---|---|---|"]
    import ferroquant as fq

    model = fresh()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    fq.quantize(model, fq.GPTQ(scheme="W4A16", group_size=128, ignore=["lm_head"]), tokens,
                device=dev, show_progress=False)  # fmt: skip
    sync(dev)
    t_fq = time.perf_counter() - t0
    rows.append(f"| ferroquant | {t_fq:.1f} | {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} |")
    del model
    torch.cuda.empty_cache()
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as e:
        rows.append(f"| llm-compressor | not installed ({e.name}) | |")
    else:
        model = fresh()
        ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": [[1] * 2048] * 128})
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        oneshot(
            model=model, dataset=ds,
            recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=128, max_seq_length=2048,
        )  # fmt: skip
        sync(dev)
        t_lc = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        rows.append(f"| llm-compressor GPTQModifier | {t_lc:.1f} | {peak:.1f} |")
        rows.append(f"| speedup | {t_lc / t_fq:.1f}x | |")
    print("\n".join(rows), flush=True)
    return lines + rows + [""]


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from ferroquant import cuda as fqcuda
    from ferroquant import solver

    if args.cpu_smoke:
        dev, backend, name = torch.device("cpu"), solver, f"CPU smoke run ({platform.machine()})"
        shapes, sizes = [(64, 256), (256, 64)], [128]
        args.tokens, args.batch_tokens, args.reps = 1024, 256, 1
        gemm = gemm_tflops(dev, torch.float32, n=512, reps=2)
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: torch sees no CUDA device", file=sys.stderr)
            return 2
        if not fqcuda.available():
            print(f"gpu_bench: ferroquant's CUDA path is not available: "
                  f"{fqcuda.unavailable_reason()}", file=sys.stderr)  # fmt: skip
            return 2
        dev = torch.device("cuda", torch.cuda.current_device())
        backend, name = fqcuda, fqcuda.device_name(dev)
        shapes, sizes = LAYER_SHAPES, [4096, 14336]
        gemm = gemm_tflops(dev, torch.bfloat16)
    date = _dt.date.today().isoformat()
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    head = [
        f"# ferroquant GPU benchmark, {date}",
        "",
        (
            f"Device: **{name}** (driver {driver}); torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}); Python {platform.python_version()}."
        ),
        "",
    ]
    print("\n".join(head), flush=True)
    body = layer_section(args, dev, backend, shapes)
    body += hessian_section(args, dev, backend, sizes, gemm)
    if args.e2e and not args.cpu_smoke:
        body += e2e_section(args, dev)
    out = args.out
    if out is None:
        tag = "cpu-smoke" if args.cpu_smoke else date
        out = ROOT / "benches" / "results" / f"gpu-{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + body) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
