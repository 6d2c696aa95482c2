"""Activation and KV-cache quantization: the run-time arithmetic against compressed-tensors and
the Rust kernels, static scales against the statistics of the tensors they were calibrated on,
path independence (one pass, per sample, ragged), and the errors a user can hit."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ferroquant import activations, observers
from ferroquant.activations import ActivationQuantizer, fake_quantize
from ferroquant.api import quantize
from ferroquant.calibration import CalibrationSet, from_tensors
from ferroquant.config import ActivationArgs
from tiny_models import random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(seed: int = 0, shape: tuple[int, ...] = (3, 7, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.linspace(0.2, 4.0, shape[-1])
    x.view(-1)[::37] *= 9.0
    return x


# ---- the arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, bits, sym", [("int", 8, True), ("int", 8, False),
                                             ("int", 4, True), ("float", 8, True)])
def test_dynamic_per_token_equals_the_rust_kernel(kind: str, bits: int, sym: bool) -> None:
    x = _x()
    args = ActivationArgs(type=kind, num_bits=bits, symmetric=sym, strategy="token",
                          dynamic=True)
    ours = fake_quantize(x, args)
    ref, _, _ = observers.dynamic_token_fake_quantize(x, type=kind, num_bits=bits,
                                                      symmetric=sym)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def _ct_fake_quantize(x, args: ActivationArgs, scale=None, zero=None):
    ct_fwd = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    ct_args = pytest.importorskip("compressed_tensors.quantization.quant_args")
    a = ct_args.QuantizationArgs(**args.model_dump(exclude={"observer", "observer_kwargs"}))
    if args.dynamic:
        scale, zero = ct_helpers.compute_dynamic_scales_and_zp(x, a, module=None)
    return ct_fwd.fake_quantize(x, scale, zero, a)


@pytest.mark.parametrize("kind, strategy, sym, group", [
    ("int", "token", True, None), ("int", "token", False, None), ("float", "token", True, None),
    ("int", "tensor", True, None), ("float", "tensor", True, None), ("int", "group", True, 8),
])
def test_dynamic_equals_compressed_tensors(kind, strategy, sym, group) -> None:
    x = _x(1)
    args = ActivationArgs(type=kind, strategy=strategy, symmetric=sym, group_size=group,
                          dynamic=True)
    torch.testing.assert_close(fake_quantize(x, args), _ct_fake_quantize(x, args),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind, sym", [("int", True), ("int", False), ("float", True)])
def test_static_equals_compressed_tensors_and_the_rust_kernel(kind: str, sym: bool) -> None:
    x = _x(2)
    args = ActivationArgs(type=kind, strategy="tensor", symmetric=sym,
                          observer="static_minmax")
    q = ActivationQuantizer(args)
    q.observe(x[:2].reshape(-1, 32))
    q.observe(x[2:].reshape(-1, 32))
    q.freeze(torch.float32)
    # static_minmax: the absolute range over every batch, compressed-tensors' qparams rule
    ct_helpers = pytest.importorskip("compressed_tensors.quantization.utils.helpers")
    ct_args = pytest.importorskip("compressed_tensors.quantization.quant_args")
    a = ct_args.QuantizationArgs(type=kind, num_bits=8, symmetric=sym)
    s, z = ct_helpers.calculate_qparams(x.min().reshape(1), x.max().reshape(1), a)
    torch.testing.assert_close(q.scale, s.float(), rtol=0, atol=0)
    if not sym:
        assert torch.equal(q.zero_point, z.to(torch.int32))
    q.enabled = True
    ours = q(x)
    torch.testing.assert_close(ours, _ct_fake_quantize(x, args, q.scale, q.zero_point),
                               rtol=0, atol=0)
    rust = (observers.fake_quantize_fp8(x, q.scale) if kind == "float"
            else observers.fake_quantize_int(x, q.scale, q.zero_point))
    torch.testing.assert_close(ours, rust, rtol=0, atol=1e-6)


def test_minmax_is_llm_compressors_moving_average() -> None:
    batches = [_x(s, (1, 5, 32)) for s in range(4)]
    q = ActivationQuantizer(ActivationArgs(strategy="tensor", observer="minmax",
                                           observer_kwargs={"averaging_constant": 0.5}))
    for b in batches:
        q.observe(b.reshape(-1, 32))
    q.freeze(torch.float32)
    lo, hi = batches[0].min(), batches[0].max()
    for b in batches[1:]:
        lo, hi = lo + 0.5 * (b.min() - lo), hi + 0.5 * (b.max() - hi)
    expect = torch.maximum(lo.abs(), hi.abs()) / 127.5
    torch.testing.assert_close(q.scale, expect.reshape(1), rtol=1e-6, atol=0)


# ---- static scales from the pipeline ------------------------------------------------------


def _calib(n: int = 4, seq: int = 16):
    return from_tensors(random_ids(n, seq, seed=11))


def _first_inputs(model, calib, name: str) -> torch.Tensor:
    """Every calibration token's input to module ``name`` of the float model."""
    seen = []
    mod = dict(model.named_modules())[name]
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1,
                                                                                 a[0].shape[-1])))
    with torch.no_grad():
        for s in calib:
            model(**s) if isinstance(s, dict) else model(s)
    h.remove()
    return torch.cat(seen)


def test_static_input_scale_is_the_range_of_the_layers_inputs() -> None:
    model = tiny_lm("llama")
    calib = _calib()
    ids = random_ids(4, 16, seed=11)
    # block 0's q_proj sees the embeddings' norm: no quantized layer upstream
    x = _first_inputs(copy.deepcopy(model), [ids[s:s + 1] for s in range(4)],
                      "model.layers.0.self_attn.q_proj")
    quantize(model, "W8A8_STATIC", calib, method="rtn", show_progress=False)
    q = model.model.layers[0].self_attn.q_proj.fq_input
    assert q.enabled and q.zero_point is None
    torch.testing.assert_close(q.scale, (x.abs().max() / 127.5).reshape(1), rtol=1e-6, atol=0)
    # q/k/v share one input and one scale; the in-memory model quantizes its activations
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.fq_input.scale, q.scale)
    seen = []
    h = attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(ids[:1])
    h.remove()
    grid = seen[0] / q.scale
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "observer": "static_minmax"}


@pytest.mark.parametrize("recipe, method", [
    ({"scheme": "W8A8_STATIC"}, "rtn"),
    ({"scheme": "W4A8", "group_size": 16}, "gptq"),
    ({"scheme": "W4A16", "group_size": 16, "kv_cache_scheme": KV_FP8}, "gptq"),
    ({"scheme": "FP8", "kv_cache_scheme": {**KV_FP8, "strategy": "attn_head"}}, "rtn"),
])
def test_one_pass_per_sample_and_ragged_agree(recipe, method) -> None:
    ids = random_ids(4, 16, seed=3)
    evalids = random_ids(2, 16, seed=8)
    base = tiny_lm("llama")
    outs, paths = [], []
    for kw in ({}, {"batched": False}):
        m = copy.deepcopy(base)
        rep = quantize(m, recipe, from_tensors(ids), method=method, show_progress=False, **kw)
        outs.append(_logits(m, evalids))
        paths.append(rep.block_paths)
    assert paths == [["batched"] * 2, ["per-sample"] * 2]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # ragged rows: one padded batch; pads reach no observer (same scales as per sample)
    ragged = from_tensors([ids[0:1, :16], ids[1:2, :9], ids[2:3, :13]])
    scales, outs = [], []
    for kw in ({}, {"batched": False}):
        m = copy.deepcopy(base)
        quantize(m, recipe, ragged, method=method, show_progress=False, **kw)
        outs.append(_logits(m, evalids))
        scales.append([(n, q.scale) for n, mod in m.named_modules()
                       for q in (mod.__dict__.get("fq_input"),
                                 getattr(mod.__dict__.get("fq_kv"), "k", None))
                       if q is not None and q.scale is not None])
    static = recipe["scheme"] != "W4A8"
    assert [n for n, _ in scales[0]] == [n for n, _ in scales[1]] and bool(scales[0]) == static
    for (n, a), (_, b) in zip(*scales):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=n)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-4)


def test_kv_scale_is_the_range_of_the_cached_keys_after_rope() -> None:
    model = tiny_lm("llama")
    ids = random_ids(3, 16, seed=6)
    float_model = copy.deepcopy(model)
    with torch.no_grad():
        caches = [float_model(ids[s:s + 1], use_cache=True).past_key_values for s in range(3)]
    # weights of the attention left float: block 0's cached keys are the float model's
    recipe = {"scheme": {"W4A16": ["re:.*mlp.*"]}, "group_size": 16,
              "kv_cache_scheme": {**KV_FP8, "strategy": "attn_head"}}
    quantize(model, recipe, from_tensors(ids), method="rtn", show_progress=False)
    kv = model.model.layers[0].self_attn.fq_kv
    keys = torch.cat([c.layers[0].keys for c in caches], dim=2)  # [1, heads, tokens, dim]
    values = torch.cat([c.layers[0].values for c in caches], dim=2)
    per_head = keys.abs().amax(dim=(0, 2, 3)) / 448
    torch.testing.assert_close(kv.k.scale.flatten(), per_head, rtol=1e-6, atol=0)
    torch.testing.assert_close(kv.v.scale.flatten(), values.abs().amax(dim=(0, 2, 3)) / 448,
                               rtol=1e-6, atol=0)
    # generation with a real cache stores quantized keys: on the FP8 grid of their head
    with torch.no_grad():
        cache = model(ids[:1], use_cache=True).past_key_values
    k = cache.layers[0].keys[0]  # [heads, tokens, dim]
    grid = k / kv.k.scale
    torch.testing.assert_close(grid.to(torch.float8_e4m3fn).float(), grid, rtol=1e-6, atol=0)
    # without the scheme the cache holds float keys
    with torch.no_grad():
        plain = float_model(ids[:1], use_cache=True).past_key_values.layers[0].keys[0]
    g = plain / kv.k.scale
    assert not torch.allclose(g.to(torch.float8_e4m3fn).float(), g, rtol=1e-6, atol=0)


def test_fp8_weights_under_gptq_are_rounded_to_nearest_and_said_so() -> None:
    model = tiny_lm("llama")
    rep = quantize(model, "FP8_DYNAMIC", _calib(), show_progress=False)
    assert {r.method for r in rep} == {"rtn-fp8"}
    assert all("FP8 weights are rounded to nearest" in r.note for r in rep)
    w = model.model.layers[0].mlp.up_proj
    qw = w.fq_quant
    assert qw.codes.dtype == torch.float8_e4m3fn and qw.scales.shape == (w.out_features, 1)
    assert torch.equal(w.weight, qw.dequantize(w.weight.dtype))


# ---- cleanliness and errors ---------------------------------------------------------------


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_stay_only_as_the_quantized_models_and_detach_removes_them() -> None:
    model = tiny_lm("llama")
    rep = quantize(model, {"scheme": "W8A8", "kv_cache_scheme": KV_FP8}, _calib(), method="rtn",
                   show_progress=False)
    summary = rep.summary()
    assert "activations: input int8 per-token dynamic (symmetric) on 14 layers" in summary
    assert "KV cache: fp8 per-tensor static (symmetric, static_minmax) on 2 attention" in summary
    n_linear = sum(1 for m in model.modules() if "fq_input" in m.__dict__)
    assert n_linear == 14 and _hooks(model) == n_linear + 2  # + one KV hook per attention
    assert activations.detach(model) == n_linear + 2 and _hooks(model) == 0


def test_an_error_mid_calibration_leaves_no_hook(monkeypatch) -> None:
    from ferroquant.modifiers import QuantizationModifier

    model = tiny_lm("llama")
    real = QuantizationModifier.on_block_end

    def fail_second(self, block):
        real(self, block)
        if block == 1:
            raise RuntimeError("boom")

    monkeypatch.setattr(QuantizationModifier, "on_block_end", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        quantize(model, {"scheme": "W8A8_STATIC", "kv_cache_scheme": KV_FP8}, _calib(),
                 method="rtn", show_progress=False)
    assert _hooks(model) == 0
    assert not any(k in m.__dict__ for m in model.modules()
                   for k in ("fq_input", "fq_kv", "_fq_act_handles"))


def test_kv_cache_scheme_on_a_model_without_projections_lists_its_attention() -> None:
    model = tiny_lm("gpt2")
    with pytest.raises(ValueError, match=r"kv_cache_scheme .* has none\. Attention modules it "
                                         r"has: transformer\.h\.0\.attn \(GPT2Attention: c_attn"):
        quantize(model, {"scheme": "W8A16", "group_size": 16, "kv_cache_scheme": KV_FP8},
                 _calib(), method="rtn", show_progress=False)
    assert _hooks(model) == 0


def test_static_scheme_on_zero_samples_is_an_error_before_any_work() -> None:
    with pytest.raises(ValueError, match="static activation scales.*need calibration samples"):
        quantize(tiny_lm("llama"), "W8A8_STATIC", CalibrationSet([], [], 16, 0),
                 method="rtn", show_progress=False)


def test_dynamic_output_activations_put_each_output_token_on_its_grid() -> None:
    model = tiny_lm("llama")
    recipe = {"config_groups": {"g": {
        "targets": ["re:.*down_proj$"], "weights": {"num_bits": 8, "strategy": "channel"},
        "output_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}}}}
    quantize(model, recipe, _calib(), method="rtn", show_progress=False)
    down = model.model.layers[0].mlp.down_proj
    raw, final = [], []
    h1 = down.register_forward_hook(lambda m, a, o: raw.append(o), prepend=True)
    h2 = down.register_forward_hook(lambda m, a, o: final.append(o))
    with torch.no_grad():
        model(random_ids(1, 16, seed=2))
    h1.remove(), h2.remove()
    x = raw[0].reshape(-1, raw[0].shape[-1])
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    expect = (x / scale).round().clamp(-128, 127) * scale
    torch.testing.assert_close(final[0].reshape(expect.shape), expect, rtol=0, atol=1e-7)
    assert not torch.equal(final[0], raw[0])
    assert "fq_input" not in down.__dict__ and "fq_output" in down.__dict__


@pytest.mark.parametrize("scheme", ["W8A8", "W4A16", "FP8_DYNAMIC"])
def test_nothing_to_calibrate_runs_no_forward_and_changes_nothing(monkeypatch, scheme) -> None:
    from ferroquant.pipeline import NO_PASS, SequentialPipeline

    base = tiny_lm("llama")
    recipe = {"scheme": scheme, **({"group_size": 16} if scheme == "W4A16" else {})}
    fast = copy.deepcopy(base)
    rep = quantize(fast, recipe, _calib(), method="rtn", show_progress=False)
    assert rep.block_paths == [NO_PASS] * 2 and rep.phase_seconds["capture"] == 0.0
    monkeypatch.setattr(SequentialPipeline, "_needs_data", lambda self: True)
    slow = copy.deepcopy(base)
    rep2 = quantize(slow, recipe, _calib(), method="rtn", show_progress=False)
    assert rep2.block_paths == ["batched"] * 2
    ids = random_ids(2, 16, seed=4)
    assert torch.equal(_logits(fast, ids), _logits(slow, ids))
