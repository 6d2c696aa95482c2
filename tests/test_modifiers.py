"""Modifiers on the calibration lifecycle: the state machine, the hook registry leaving the
model clean after an error, round-to-nearest as a modifier, and target ownership."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ferroquant import solver
from ferroquant.api import quantize
from ferroquant.blocks import find_blocks
from ferroquant.calibration import from_tensors
from ferroquant.config import GPTQ
from ferroquant.hooks import HookRegistry
from ferroquant.modifiers import GPTQModifier, LifecycleError, QuantizationModifier
from ferroquant.modifiers.quantization import Stats
from ferroquant.pipeline import SequentialPipeline
from tiny_models import ToyLM, random_ids, tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calib(n: int = 3):
    return from_tensors(random_ids(n, 16, seed=5))


def test_lifecycle_order_is_enforced() -> None:
    model = tiny_lm("llama")
    m = GPTQModifier(GPTQ(group_size=16))
    with pytest.raises(LifecycleError, match="cannot go to 'calibrating' from 'created'"):
        m.start_calibration(model)
    m.initialize(model, find_blocks(model))
    with pytest.raises(LifecycleError, match="cannot go to 'finished' from 'initialized'"):
        m.end_calibration(model)
    m.start_calibration(model)
    assert m.state == "calibrating"
    m.end_calibration(model)
    assert m.state == "finished" and model.fq_recipe is m.recipe
    with pytest.raises(LifecycleError):
        m.initialize(model, find_blocks(model))


def _clean(model: nn.Module) -> list[str]:
    """Everything calibration could leave behind on a module."""
    left = []
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            left.append(f"{name}: hooks")
        if "forward" in mod.__dict__:
            left.append(f"{name}: forward replaced")
        left += [f"{name}: {p_name} is {p.dtype}" for p_name, p in mod.named_parameters(
            recurse=False) if p.dtype != torch.float32]
    return left


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("forward_dtype", [None, "bfloat16"])
def test_an_error_mid_calibration_leaves_the_model_clean(monkeypatch, batched: bool,
                                                         forward_dtype: str | None) -> None:
    model = tiny_lm("llama")
    calls = []
    real = GPTQModifier.on_module_ready

    def failing(self, t, subset):
        calls.append(t.name)
        if len(calls) == 5:  # in block 0 (7 targets), after o_proj: hooks are registered
            raise _Boom("solver failed")
        return real(self, t, subset)

    monkeypatch.setattr(GPTQModifier, "on_module_ready", failing)
    modifier = GPTQModifier(GPTQ(group_size=16, forward_dtype=forward_dtype))
    pipe = SequentialPipeline(model, [modifier], show_progress=False, batched=batched,
                              forward_dtype=forward_dtype)
    with pytest.raises(_Boom):
        pipe.run(_calib())
    assert _clean(model) == []
    assert len(pipe.hooks) == 0
    assert modifier.state == "finished"
    assert all(t.state is None and t.live is t.module for t in modifier.all_targets())


def test_an_error_in_capture_restores_every_forward() -> None:
    model = tiny_lm("llama")
    bad = from_tensors(torch.full((1, 8), 10_000))  # out of the vocabulary: embedding fails
    with pytest.raises(IndexError):
        quantize(model, GPTQ(group_size=16), bad, show_progress=False)
    assert _clean(model) == []


def test_registry_removes_by_group_and_on_close() -> None:
    lin = nn.Linear(4, 4)
    reg = HookRegistry()
    reg.pre("a", lin, lambda m, i: None)
    reg.post("b", lin, lambda m, i, o: None)
    reg.replace_forward("b", lin, lambda x: x)
    assert len(reg) == 3 and "forward" in lin.__dict__
    reg.remove("b")
    assert len(reg) == 1 and not lin._forward_hooks and "forward" not in lin.__dict__
    with reg:
        pass
    assert len(reg) == 0 and not lin._forward_pre_hooks


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_rtn_method_is_round_to_nearest_of_every_target(observer: str) -> None:
    model = tiny_lm("opt")
    ref = copy.deepcopy(model)
    recipe = GPTQ(group_size=16, observer=observer)
    rep = quantize(model, recipe, _calib(), method="rtn", show_progress=False)
    assert len(rep) == 12 and {r.method for r in rep} == {"rtn"}
    for r in rep:
        w = ref.get_submodule(r.name).weight
        want = solver.rtn_quantize(w, bits=4, symmetric=True, group_size=16, observer=observer)
        q = model.get_submodule(r.name).fq_quant
        assert torch.equal(q.codes, want.codes) and torch.equal(q.scales, want.scales), r.name
        assert torch.equal(model.get_submodule(r.name).weight, want.dequantized), r.name
    # the propagation pass still runs every block (a report per block path)
    assert len(rep.block_paths) == 2


def test_a_module_targeted_by_two_modifiers_is_an_error() -> None:
    model = tiny_lm("llama")
    mods = [GPTQModifier(GPTQ(group_size=16)), QuantizationModifier(GPTQ(group_size=16))]
    with pytest.raises(ValueError, match="is a target of both GPTQModifier and "
                                         "QuantizationModifier"):
        SequentialPipeline(model, mods, show_progress=False).run(_calib())
    assert _clean(model) == []


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="method 'awq': expected one of gptq, qronos, gptaq, rtn"):
        quantize(ToyLM(), GPTQ(), _calib(), method="awq")  # type: ignore[arg-type]


class _FixedHessian:
    """A statistic standing in for an accumulator: a given Hessian."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h

    def hessian(self) -> torch.Tensor:
        return self.h


def _fixed(h: torch.Tensor) -> Stats:
    return Stats(_FixedHessian(h), None, samples=8)


def _lone_target(modifier: GPTQModifier, in_features: int = 4):
    from ferroquant.modifiers import Target

    lin = nn.Linear(in_features, 3, bias=False)
    args = modifier.groups["group_0"].weights
    return Target("block.0.fc", lin, args, modifier, 0)


def test_damping_escalation_is_a_warning_naming_the_layer() -> None:
    m = GPTQModifier(GPTQ(group_size=-1))
    t = _lone_target(m)
    # eigenvalues 2.02 and -0.02: indefinite until the damping exceeds 2% of mean(diag)
    t.state = _fixed(torch.tensor([[1.0, 1.02, 0, 0], [1.02, 1.0, 0, 0],
                                          [0, 0, 1.0, 0], [0, 0, 0, 1.0]]))
    with pytest.warns(RuntimeWarning, match=r"layer 'block\.0\.fc': the damped Hessian was not "
                                            r"positive definite at dampening_frac=0\.01; raised "
                                            r"to 0\.04 \(tried 0\.01, 0\.02, 0\.04\)"):
        rep = m.on_module_ready(t, 0)
    assert rep.damp_frac == 0.04 and rep.damp_attempts == [0.01, 0.02, 0.04]


def test_no_warning_when_the_first_damping_works(recwarn) -> None:
    m = GPTQModifier(GPTQ(group_size=-1))
    t = _lone_target(m)
    t.state = _fixed(torch.eye(4))
    m.on_module_ready(t, 0)
    assert not [w for w in recwarn if "damped" in str(w.message)]


def test_cuda_core_failing_to_load_is_a_warning(monkeypatch) -> None:
    from ferroquant import cuda as fqcuda
    from ferroquant.modifiers import gptq as gptq_mod

    class _FakeCudaTensor:
        is_cuda = True
        shape = (2, 4)

    monkeypatch.setattr(fqcuda, "available", lambda: False)
    monkeypatch.setattr(fqcuda, "unavailable_reason", lambda: "libcublas.so.13 not found")
    monkeypatch.setattr(gptq_mod, "_warned_cuda", set())
    m = GPTQModifier(GPTQ(group_size=-1))
    t = _lone_target(m)
    with pytest.warns(RuntimeWarning, match=r"CUDA core did not load \(libcublas\.so\.13 not "
                                            r"found\); Hessians and solves run on the CPU core"):
        state = m.new_state(t, _FakeCudaTensor())  # type: ignore[arg-type]
    assert isinstance(state.core, solver.HessianAccumulator)
