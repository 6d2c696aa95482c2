"""The checkpoint is what was solved: quantize for a format, save, load, and every quantized
weight (and the logits) equal the in-memory quantized model's exactly - for GPTQ (float16
scales) and compressed-tensors (scales in the model's dtype), float32 and bfloat16 models,
symmetric and asymmetric schemes. Scales are rounded to their storage dtype inside the solver,
before codes are chosen, so nothing is rounded at save time."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ferroquant as fq
from ferroquant.calibration import from_tensors
from tiny_models import random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_saved_checkpoint_loads_as_the_solved_model(tmp_path, fmt: str, dtype: torch.dtype,
                                                    scheme: str) -> None:
    model = tiny_lm("llama")
    for p in model.parameters():  # buffers (rotary frequencies) stay float32, as from_pretrained
        p.data = p.data.to(dtype)
    calib = from_tensors(random_ids(4, 24, seed=11))
    fq.quantize(model, {"scheme": scheme, "group_size": 16}, calib, format=fmt,
                show_progress=False)
    expected = {"gptq": torch.float16, "compressed-tensors": dtype}[fmt]
    assert model.fq_target["scale_dtype"] == expected
    fq.save(model, tmp_path / "ckpt")
    loaded = fq.load(tmp_path / "ckpt")
    n = 0
    for name, mod in model.named_modules():
        q = getattr(mod, "fq_quant", None)
        if q is None:
            continue
        n += 1
        # scales were chosen on the storage grid: storing them loses nothing
        assert torch.equal(q.scales.to(expected).float(), q.scales), name
        got = loaded.get_submodule(name)
        assert torch.equal(got.fq_quant.codes, q.codes), name
        assert torch.equal(got.dequantize(mod.weight.dtype), mod.weight), name
    assert n == 14
    ids = random_ids(2, 16, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
