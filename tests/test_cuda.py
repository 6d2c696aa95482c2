"""The CUDA path (ferroquant.cuda).

Everywhere: the no-CUDA fallback (clear RuntimeError, never a crash), option checks identical
to the CPU solver's, argument checks. On a machine with an NVIDIA GPU (skipped elsewhere): GPU
results against the CPU solver - codes identical except at rounding ties, proxy loss within
0.1%, Hessians equal to float32 noise, and the same errors for NaN / non-PD inputs.
"""

from __future__ import annotations

import pytest
import torch
from ferroquant import _core, solver
from ferroquant import cuda as fqcuda

HAS_CUDA = torch.cuda.is_available() and fqcuda.available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with CUDA 13 libraries")


# --------------------------------------------------------------------------------------------
# everywhere
# --------------------------------------------------------------------------------------------


def test_availability_is_a_bool_with_a_reason() -> None:
    ok = fqcuda.available()
    assert isinstance(ok, bool)
    reason = fqcuda.unavailable_reason()
    if ok:
        assert reason is None
    else:
        assert isinstance(reason, str) and len(reason) > 10
    assert _core.cuda_available() == ok


@pytest.mark.skipif(fqcuda.available(), reason="checks the fallback on machines without CUDA")
def test_without_cuda_every_entry_point_raises_runtime_error() -> None:
    w = torch.randn(8, 16)
    h = torch.eye(16)
    with pytest.raises(RuntimeError, match="CUDA is not available: "):
        fqcuda.gptq_quantize(w, h)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        fqcuda.HessianAccumulator(16)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        fqcuda.device_name(0)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _core.cuda_gptq_workspace_bytes(8, 16, 0)
    # Non-null fake addresses: refused before anything dereferences them.
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _core.cuda_gptq_solve(8, 8, 8, 8, 8, 8, 8, 1 << 20, 8, 16, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        _core.cuda_hessian_add(8, 16, 8, 4, "bfloat16", 0, 0, 8, 0, 0)
    # The layer name is prefixed, as on CPU.
    with pytest.raises(RuntimeError, match="layer 'blk.0.q': CUDA is not available"):
        fqcuda.gptq_quantize(w, h, name="blk.0.q")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 5},
        {"group_size": 0},
        {"group_size": -2},
        {"block_size": 0},
        {"damp_percent": 0.0},
        {"damp_growth": 1.0},
        {"damp_max": 0.001},
        {"observer": "median"},
        {"scale_dtype": "half"},
        {"scale_dtype": torch.int8},
    ],
)
def test_option_errors_match_the_cpu_solver(kwargs: dict) -> None:
    w = torch.randn(4, 8)
    h = torch.eye(8)
    with pytest.raises(ValueError) as cpu:
        solver.gptq_quantize(w, h, **kwargs)
    with pytest.raises(ValueError) as dev:
        fqcuda.gptq_quantize(w, h, **kwargs)
    assert str(dev.value) == str(cpu.value)


def test_mse_observer_is_refused_with_a_pointer_to_cpu() -> None:
    with pytest.raises(ValueError, match="MSE observer is not implemented on the CUDA path"):
        fqcuda.gptq_quantize(torch.randn(4, 8), torch.eye(8), observer="mse")


def test_argument_types_and_null_addresses() -> None:
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor, got list"):
        fqcuda.gptq_quantize([[1.0]], torch.eye(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hessian: expected a torch.Tensor"):
        fqcuda.gptq_quantize(torch.ones(1, 1), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        fqcuda.HessianAccumulator(0)
    # The bindings refuse null device addresses and bad dtypes before looking for CUDA.
    with pytest.raises(ValueError, match="weight: null device address"):
        _core.cuda_gptq_solve(0, 8, 8, 8, 8, 8, 8, 1 << 20, 8, 16, 0, 0)
    with pytest.raises(ValueError, match="dtype must be"):
        _core.cuda_hessian_add(8, 16, 8, 4, "int8", 0, 0, 8, 0, 0)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        _core.cuda_gptq_workspace_bytes(0, 16, 0)


@pytest.mark.skipif(not HAS_CUDA, reason="CPU tensors are refused only once CUDA is there")
def test_cpu_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        fqcuda.gptq_quantize(torch.randn(4, 8), torch.eye(8))


# --------------------------------------------------------------------------------------------
# on a GPU
# --------------------------------------------------------------------------------------------


def _activations(
    tokens: int, n: int, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = n // 2 + 3
    z = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    a = torch.randn(k, n, generator=g, dtype=torch.float64)
    a *= torch.exp(-torch.arange(n, dtype=torch.float64) / (n / 3)) + 0.05
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    return (z @ a + 0.3 * mu).to(dtype)


def _problem(
    rows: int, cols: int, seed: int, dead: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _activations(2 * cols + 64, cols, seed)
    for d in dead:
        x[:, d] = 0
    acc = solver.HessianAccumulator(cols)
    acc.add_batch(x)
    g = torch.Generator().manual_seed(seed + 1)
    w = 0.2 * torch.randn(rows, cols, generator=g)
    return w, acc.hessian()


def _compare(cpu: solver.LayerQuantResult, dev: solver.LayerQuantResult, bits: int) -> None:
    assert dev.codes.is_cuda and dev.dequantized.is_cuda
    assert torch.equal(dev.g_idx.cpu(), cpu.g_idx)
    assert (dev.perm is None) == (cpu.perm is None)
    if cpu.perm is not None:
        assert torch.equal(dev.perm.cpu(), cpu.perm)
    assert dev.dead_columns == cpu.dead_columns
    assert dev.damp_attempts == cpu.damp_attempts
    codes = dev.codes.cpu().to(torch.int32)
    diff = (codes - cpu.codes.to(torch.int32)).abs()
    assert int(diff.max()) <= 1
    # Rounding ties flip a code and then that row's later columns legitimately diverge; such
    # rows are rare (the CPU model of the kernel saw at most 1 in 24 rows per configuration,
    # mostly at 8 bits). Every other row is identical.
    rows_with_flip = int((diff.sum(dim=1) > 0).sum())
    assert rows_with_flip <= max(2, codes.shape[0] // 20), f"{rows_with_flip} rows differ"
    assert codes.max() <= (1 << bits) - 1
    rel = abs(dev.loss - cpu.loss) / abs(cpu.loss)
    assert rel < 1e-3, f"loss {dev.loss} vs cpu {cpu.loss}"
    same = diff.sum(dim=1) == 0
    torch.testing.assert_close(dev.scales.cpu()[same], cpu.scales[same], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        dev.dequantized.cpu()[same], cpu.dequantized[same], rtol=1e-4, atol=1e-6
    )


CONFIGS = [
    (bits, sym, group, act, static)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for group, act, static in [
        (-1, False, False),
        (-1, True, False),
        (128, False, False),
        (32, True, False),
        (48, False, False),
        (200, True, False),
        (64, True, True),
    ]
]


@gpu
@pytest.mark.parametrize(("bits", "sym", "group", "act", "static"), CONFIGS)
def test_gpu_solve_matches_cpu(bits: int, sym: bool, group: int, act: bool, static: bool) -> None:
    w, h = _problem(256, 512, seed=bits * 7 + group, dead=(5, 300))
    kw = {
        "bits": bits,
        "symmetric": sym,
        "group_size": group,
        "act_order": act,
        "static_groups": static,
    }
    cpu = solver.gptq_quantize(w, h, **kw)
    dev = fqcuda.gptq_quantize(w.cuda(), h.cuda(), **kw)
    _compare(cpu, dev, bits)


@gpu
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("bits", "sym", "group", "act", "static"),
    [(4, True, -1, False, False), (3, False, 128, False, False), (4, False, 32, True, False),
     (2, False, 200, True, False), (8, True, 64, True, True)],
)
def test_gpu_solve_with_rounded_scales_matches_cpu(
    scale_dtype: torch.dtype, bits: int, sym: bool, group: int, act: bool, static: bool
) -> None:
    w, h = _problem(256, 512, seed=bits * 5 + group, dead=(7,))
    kw = {
        "bits": bits,
        "symmetric": sym,
        "group_size": group,
        "act_order": act,
        "static_groups": static,
        "scale_dtype": scale_dtype,
    }
    cpu = solver.gptq_quantize(w, h, **kw)
    dev = fqcuda.gptq_quantize(w.cuda(), h.cuda(), **kw)
    _compare(cpu, dev, bits)
    s = dev.scales.cpu()
    assert torch.equal(s.to(scale_dtype).float(), s)
    gi = dev.g_idx.long()
    rebuilt = dev.scales[:, gi] * (dev.codes.float() - dev.zeros[:, gi].float())
    assert torch.equal(dev.dequantized, rebuilt)


@gpu
def test_gpu_float16_scale_overflow_gives_the_cpu_error() -> None:
    w, h = _problem(8, 64, seed=3)
    w[2, 9] = 4.0e6
    with pytest.raises(ValueError) as cpu:
        solver.gptq_quantize(w, h, group_size=16, scale_dtype="float16", name="blk.1.v")
    with pytest.raises(ValueError) as dev:
        fqcuda.gptq_quantize(w.cuda(), h.cuda(), group_size=16, scale_dtype="float16", name="blk.1.v")
    assert str(dev.value) == str(cpu.value)
    assert "layer 'blk.1.v'" in str(dev.value) and "float16" in str(dev.value)


@gpu
def test_gpu_solve_on_a_side_stream_and_odd_shapes() -> None:
    for rows, cols in [(1, 1), (3, 7), (37, 129), (130, 300)]:
        w, h = _problem(rows, cols, seed=rows)
        cpu = solver.gptq_quantize(w, h, group_size=16, act_order=True)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            dev = fqcuda.gptq_quantize(w.cuda(), h.cuda(), group_size=16, act_order=True)
        torch.cuda.current_stream().wait_stream(s)
        _compare(cpu, dev, 4)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_hessian_matches_cpu(dtype: torch.dtype) -> None:
    n = 384
    x = _activations(1000, n, seed=3, dtype=dtype)
    cpu = solver.HessianAccumulator(n)
    dev = fqcuda.HessianAccumulator(n)
    for part in (x[:1], x[1:300], x[300:]):
        cpu.add_batch(part)
        dev.add_batch(part.cuda())
    assert dev.samples == cpu.samples == 1000
    torch.testing.assert_close(dev.hessian().cpu(), cpu.hessian(), rtol=2e-5, atol=1e-5)
    # Merge = sequential.
    a, b = fqcuda.HessianAccumulator(n), fqcuda.HessianAccumulator(n)
    a.add_batch(x[:400].cuda())
    b.add_batch(x[400:].cuda())
    a.merge(b)
    torch.testing.assert_close(a.hessian(), dev.hessian(), rtol=1e-5, atol=1e-6)


@gpu
def test_gpu_hessian_nan_gives_the_cpu_error_and_leaves_h_unchanged() -> None:
    n = 64
    x = _activations(50, n, seed=4, dtype=torch.bfloat16)
    cpu, dev = solver.HessianAccumulator(n), fqcuda.HessianAccumulator(n)
    cpu.add_batch(x)
    dev.add_batch(x.cuda())
    before = dev.hessian().clone()
    bad = x.clone()
    bad[7, 11] = float("nan")
    with pytest.raises(ValueError) as e_cpu:
        cpu.add_batch(bad)
    with pytest.raises(ValueError) as e_dev:
        dev.add_batch(bad.cuda())
    assert str(e_dev.value) == str(e_cpu.value)
    assert torch.equal(dev.hessian(), before)
    assert dev.samples == 50


@gpu
def test_gpu_bad_inputs_give_the_cpu_errors() -> None:
    w, h = _problem(16, 64, seed=9)
    wn = w.clone()
    wn[3, 5] = float("nan")
    hn = h.clone()
    hn[2, 9] = float("inf")
    for ww, hh in [(wn, h), (w, hn)]:
        with pytest.raises(ValueError) as e_cpu:
            solver.gptq_quantize(ww, hh)
        with pytest.raises(ValueError) as e_dev:
            fqcuda.gptq_quantize(ww.cuda(), hh.cuda())
        assert str(e_dev.value) == str(e_cpu.value)
    # Indefinite at every damping: same exception type, same fractions tried.
    n = 7
    hi = torch.full((n, n), 3.0)
    hi.fill_diagonal_(1.0)
    wi = torch.full((2, n), 0.5)
    with pytest.raises(solver.HessianNotPositiveDefiniteError) as e_cpu:
        solver.gptq_quantize(wi, hi, group_size=-1)
    with pytest.raises(solver.HessianNotPositiveDefiniteError) as e_dev:
        fqcuda.gptq_quantize(wi.cuda(), hi.cuda(), group_size=-1)
    head = str(e_cpu.value).split(" (last failure")[0]
    assert str(e_dev.value).startswith(head)
    # All inputs dead.
    with pytest.raises(ValueError, match="no calibration signal"):
        fqcuda.gptq_quantize(w.cuda(), torch.zeros_like(h).cuda())
    # Slightly indefinite: the same escalation as on CPU.
    hs = h.clone()
    hs -= 0.3 * hs.diagonal().mean() * torch.eye(64)
    cpu = solver.gptq_quantize(w, hs, group_size=32)
    dev = fqcuda.gptq_quantize(w.cuda(), hs.cuda(), group_size=32)
    assert len(cpu.damp_attempts) > 1
    assert dev.damp_attempts == cpu.damp_attempts


# --------------------------------------------------------------------------------------------
# the pipeline on the GPU
# --------------------------------------------------------------------------------------------


def _tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _quantize_tiny(device: str, **recipe):
    from ferroquant import quantize
    from ferroquant.calibration import from_tensors

    g = torch.Generator().manual_seed(0)
    calib = from_tensors(torch.randint(3, 128, (4, 32), generator=g))
    model = _tiny_llama()
    if device != "cpu":
        model.to(device)
    rep = quantize(model, {"scheme": "W4A16", "group_size": 16, **recipe}, calib, device="auto",
                   show_progress=False)
    return model, rep


def test_auto_device_on_a_cpu_model_quantizes_on_the_cpu() -> None:
    model, rep = _quantize_tiny("cpu")
    assert len(rep) == 14 and all(r.method == "gptq" for r in rep)
    assert all(p.device.type == "cpu" for p in model.parameters())


@gpu
def test_pipeline_on_the_gpu_matches_the_cpu() -> None:
    cpu_model, cpu_rep = _quantize_tiny("cpu")
    gpu_model, gpu_rep = _quantize_tiny("cuda")
    for a, b in zip(cpu_rep, gpu_rep):
        assert a.name == b.name and a.samples == b.samples
        # upstream layers may differ by a rounding tie, so losses agree loosely per layer
        assert abs(a.loss - b.loss) <= 1e-2 * abs(a.loss) + 1e-6, a.name
        qa = cpu_model.get_submodule(a.name).fq_quant
        qb = gpu_model.get_submodule(b.name).fq_quant
        assert (qa.codes != qb.codes).float().mean() < 0.01, a.name


@gpu
def test_offloaded_hessians_solve_on_the_cpu_core() -> None:
    # the block runs on the GPU, but Hessians and solves go through the CPU core: the same
    # Hessians up to the GPU forward's float noise, so codes agree but for rare ties
    _, cpu_rep = _quantize_tiny("cpu")
    _, gpu_rep = _quantize_tiny("cuda", offload_hessians=True)
    for a, b in zip(cpu_rep, gpu_rep):
        assert a.name == b.name and abs(a.loss - b.loss) <= 1e-2 * abs(a.loss) + 1e-6, a.name


@gpu
def test_bf16_forward_on_the_gpu() -> None:
    # forward_dtype on the GPU: the bf16 copy of each block runs there, the Hessians come from
    # bf16 activations on the GPU core, and the float32 model keeps exact dequantized weights
    model, rep = _quantize_tiny("cuda", forward_dtype="bfloat16")
    _, ref = _quantize_tiny("cuda")
    assert len(rep) == 14 and all(r.method == "gptq" and r.samples == 4 * 32 for r in rep)
    assert sum(r.loss for r in rep) == pytest.approx(sum(r.loss for r in ref), rel=0.05)
    for r in rep:
        m = model.get_submodule(r.name)
        assert m.weight.dtype == torch.float32 and m.weight.is_cuda
        assert torch.equal(m.weight.cpu(), m.fq_quant.dequantize(torch.float32)), r.name
