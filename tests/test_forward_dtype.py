"""``forward_dtype``: the blocks are calibrated as copies in another dtype, the weights are
quantized from (and written back in) their own precision.

The key property: on a float32 model whose weights are bf16 values, calibrating with
``forward_dtype="bfloat16"`` does exactly the arithmetic of calibrating the same model loaded in
bf16 (same bf16 weights, same bf16 activations, same Hessians), so both give identical codes
and scales - while the float32 model keeps float32 weights equal to ``scale * (code - zero)``
exactly, where the bf16 model can only hold them rounded."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ferroquant.api import quantize as run_gptq
from ferroquant.calibration import from_tensors
from ferroquant.config import GPTQ
from ferroquant.pipeline import SequentialPipeline
from tiny_models import ToyLM, random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch: str) -> nn.Module:
    m = tiny_lm(arch)
    with torch.no_grad():  # every parameter a bf16 value, stored in float32
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


def _calib(seed: int = 0):
    return from_tensors(random_ids(4, 24, seed))


def _quantized(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "fq_quant")}


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_forward_equals_calibrating_the_bf16_model(arch: str, batched: bool) -> None:
    f32 = _model(arch)
    b16 = copy.deepcopy(f32)
    for p in b16.parameters():  # buffers (rotary frequencies) stay float32, as forward_dtype's
        p.data = p.data.to(torch.bfloat16)
    recipe = GPTQ(group_size=16)
    # one storage dtype for the scales of both (GPTQ's float16), so their grids are the same
    ra = run_gptq(f32, recipe.model_copy(update={"forward_dtype": "bfloat16"}), _calib(),
                  show_progress=False, batched=batched, format="gptq")
    rb = run_gptq(b16, recipe, _calib(), show_progress=False, batched=batched, format="gptq")
    assert [r.name for r in ra] == [r.name for r in rb]
    assert len(ra) == {"llama": 14, "gpt2": 8}[arch]
    qa, qb = _quantized(f32), _quantized(b16)
    for r, s in zip(ra, rb):
        a, b = qa[r.name].fq_quant, qb[r.name].fq_quant
        assert torch.equal(a.codes, b.codes), r.name
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros), r.name
        assert r.samples == s.samples == 4 * 24
        assert r.loss == pytest.approx(s.loss, rel=1e-5, abs=1e-9), r.name
    for name, m in qa.items():
        # float32 kept, and holding the dequantized weights exactly (not bf16-rounded)
        w = m.weight if not isinstance(m, transformers.pytorch_utils.Conv1D) else m.weight.t()
        assert m.weight.dtype == torch.float32
        assert torch.equal(w, m.fq_quant.dequantize(torch.float32)), name
        assert torch.equal(m.weight.to(torch.bfloat16), qb[name].weight), name
    assert all(p.dtype == torch.float32 for p in f32.parameters())


def test_bf16_forward_changes_little_and_leaves_no_copies_behind() -> None:
    ref, m = _model("llama"), _model("llama")
    with torch.no_grad():  # float32 weights that are not bf16 values: quantized from those
        for p, q in zip(ref.parameters(), m.parameters()):
            noise = 1e-3 * torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    fp = copy.deepcopy(ref)
    ids = random_ids(2, 24, seed=9)
    ra = run_gptq(ref, GPTQ(group_size=16), _calib(1), show_progress=False)
    rb = run_gptq(m, GPTQ(group_size=16, forward_dtype="bf16"), _calib(1), show_progress=False)
    # layer by layer the proxy losses move by bf16 activation noise; in total by very little
    assert rb.total_loss == pytest.approx(ra.total_loss, rel=0.03)
    qa, qb = _quantized(ref), _quantized(m)
    same = all(torch.equal(qa[n].fq_quant.codes, qb[n].fq_quant.codes) for n in qa)
    assert not same  # the calibration really ran in bf16
    # ... and quantized about as well: logit error against the float model within 20%
    with torch.no_grad():
        want = fp(ids).logits
        ea = (ref(ids).logits - want).norm()
        eb = (m(ids).logits - want).norm()
    assert 0.8 < float(eb / ea) < 1.2, (float(ea), float(eb))
    # the targets point at the model's own modules again; no bf16 copy is referenced
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert rb.block_paths == ["batched", "batched"]


def test_forward_dtype_equal_to_the_model_dtype_is_a_no_op() -> None:
    a, b = _model("llama"), _model("llama")
    ra = run_gptq(a, GPTQ(group_size=16), _calib(), show_progress=False)
    rb = run_gptq(b, GPTQ(group_size=16, forward_dtype="float32"), _calib(), show_progress=False)
    for r in ra:
        assert torch.equal(a.get_submodule(r.name).weight, b.get_submodule(r.name).weight)
    assert [r.loss for r in ra] == [r.loss for r in rb]


@pytest.mark.parametrize("spelling,want", [
    ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16"),
    ("torch.float16", "float16"), ("fp32", "float32"), ("model", None), (None, None),
])
def test_forward_dtype_spellings(spelling, want) -> None:
    assert GPTQ(forward_dtype=spelling).forward_dtype == want


def test_forward_dtype_rejects_other_types_and_round_trips(tmp_path) -> None:
    with pytest.raises(ValueError, match="forward_dtype"):
        GPTQ(forward_dtype="int8")
    r = GPTQ(scheme="W4A16", forward_dtype="bf16")
    path = tmp_path / "recipe.yaml"
    r.to_file(path)
    assert GPTQ.from_file(path).forward_dtype == "bfloat16"


def test_rollback_restores_the_bf16_copy_too(monkeypatch) -> None:
    torch.manual_seed(0)
    a = ToyLM()
    b = copy.deepcopy(a)
    float_w = {n: m.weight.detach().to(torch.bfloat16) for n, m in a.named_modules()
               if isinstance(m, nn.Linear)}
    recipe = GPTQ(group_size=16, forward_dtype="bfloat16")
    # batched=True: fc1 and fc2 are solved, then fc2's second call forces a rollback to the
    # per-sample path, which must start from the float weights in the bf16 copy as well
    seen: list[bool] = []
    real = SequentialPipeline._fallback

    def spy(self, i, bname, runner, targets, *args, **kw):
        seen.extend(torch.equal(t.live.weight, float_w[t.name]) and t.live.weight.dtype ==
                    torch.bfloat16 and t.live is not t.module for t in targets)
        return real(self, i, bname, runner, targets, *args, **kw)

    monkeypatch.setattr(SequentialPipeline, "_fallback", spy)
    ra = run_gptq(a, recipe, _calib(), show_progress=False, batched=True)
    assert seen == [True] * 4
    rb = run_gptq(b, recipe, _calib(), show_progress=False, batched=False)
    assert all("runs more than once" in p for p in ra.block_paths)
    for r, s in zip(ra, rb):
        assert torch.equal(a.get_submodule(r.name).fq_quant.codes,
                           b.get_submodule(s.name).fq_quant.codes), r.name
        assert r.loss == s.loss
