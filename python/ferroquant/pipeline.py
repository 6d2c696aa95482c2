"""The sequential pipeline: calibrates a Hugging Face causal LM block by block and lets the
modifiers (:mod:`ferroquant.modifiers`) quantize it. It knows no algorithm.

1. Find the decoder blocks (:mod:`ferroquant.blocks`); each modifier resolves its targets
   (``initialize``).
2. Record every block's call arguments with one cheap pass per calibration sample
   (:func:`ferroquant.calls.capture_block_inputs`); block 0's hidden states are the embeddings.
3. Modifiers ``start_calibration``. Per block, on ``device``: modifiers needing no inputs
   quantize the block's targets first (``on_block_start``); then one calibration pass streams
   the other targets' inputs to their modifiers (:mod:`ferroquant.engines`): batched - the
   block runs ONCE over all samples stacked, each module quantized right before it runs - or,
   when samples cannot be stacked or memory is short, subset by subset over single samples or
   chunks, then one more pass for the outputs. Either way the block's outputs *after*
   quantization feed the next block, and the block returns to its original device. With the
   recipe's ``forward_dtype`` the passes run on a copy of the block in that dtype; weights are
   read from and written to the model's own modules and mirrored into the copy.
   When a modifier ``needs_float_inputs``, a second stream carries the float model's hidden
   states: each block first runs with its float weights over it (batched like the quantized
   pass), recording the float inputs of that modifier's targets (:mod:`ferroquant.floats`)
   and the next block's float inputs; the quantized pass then hands each target's modifier
   its float rows beside its own (``Modifier.add_float_pairs``).
4. Targets outside the blocks (an explicitly named ``lm_head``) are calibrated last with
   full-model forwards; modifiers ``end_calibration``.

When nothing is calibrated (round-to-nearest weights, dynamic activations only: no modifier
needs inputs, no KV cache, no float stream) no forward runs at all: each block's targets are
quantized where they are, which gives the same model as the passes would.

Every hook and replaced ``forward`` is owned by one :class:`~ferroquant.hooks.HookRegistry`,
closed whatever happens; after an error the modifiers ``abort`` and drop their statistics.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import memory
from .blocks import Blocks, find_blocks, is_quantizable, linear_weight
from .calibration import CalibrationSet
from .calls import (
    Call,
    Unbatchable,
    batch_calls,
    call_block,
    capture_block_inputs,
    check_batch_finite,
    chunk_calls,
    first_device,
    forward_model,
    model_inputs,
    padded_samples,
    to_device,
)
from .engines import OnePass, calibrate_subsets, execution_groups
from .floats import FloatInputs, float_pass
from .hooks import HookRegistry, StopForward
from .modifiers.base import KVTarget, Modifier, Target
from .report import LayerReport, QuantizationReport

__all__ = ["NO_PASS", "SequentialPipeline", "resolve_device"]

#: a block's path when nothing is calibrated (round-to-nearest weights, dynamic activations):
#: its targets are quantized in place and no forward runs
NO_PASS = "no pass (nothing to calibrate)"

logger = logging.getLogger("ferroquant")


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """``"auto"`` (or None): the device the model sits on; otherwise the one named."""
    if device is None or device == "auto":
        return first_device(model)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} was asked for but CUDA is not available")
    return dev


@dataclass
class _Flow:
    """The activations between blocks: per entry (a sample, or a chunk of stacked samples)
    the hidden states; ``stacked`` is all of them as one tensor when a batched block made it."""

    hiddens: list[torch.Tensor]
    stacked: torch.Tensor | None = None
    paths: list[str] = field(default_factory=list)
    # samples of different lengths run as ONE right-padded entry: each sample's real length
    lengths: list[int] | None = None
    # the float model's hidden states, laid out the same way, while a later block needs them
    floats: _Flow | None = None


class SequentialPipeline:
    """Runs ``modifiers`` over ``model`` block by block (see the module docstring).

    ``batched``: None (default) runs each block once over all samples stacked when the model is
    a transformers model, the samples have one length and the estimated activations fit in half
    the free memory of ``device``; when they do not fit, the subset-by-subset path runs over
    chunks of as many samples as fit; otherwise sample by sample. True always stacks all
    samples (where the captured calls allow it); False always goes sample by sample. All paths
    give the same result up to float rounding; the path taken per block is in the report's
    ``block_paths`` and the time per phase in its ``phase_seconds``."""

    def __init__(self, model: nn.Module, modifiers: Sequence[Modifier], *,
                 device: str | torch.device | None = "auto", show_progress: bool = True,
                 batched: bool | None = None, forward_dtype: str | None = None,
                 sequential_targets: list[str] | None = None) -> None:
        if not modifiers:
            raise ValueError("no modifier to run")
        self.model = model
        self.modifiers = list(modifiers)
        self.dev = resolve_device(device, model)
        self.show_progress = show_progress
        self.batched = batched
        self.fdt = getattr(torch, forward_dtype) if forward_dtype else None
        self.blocks: Blocks = find_blocks(model, sequential_targets)
        self.hooks = HookRegistry()
        self.float_until = 0  # blocks the float stream runs through (set by _initialize)
        self.reports: list[LayerReport] = []
        self.float_seconds = 0.0

    # ---- set-up ---------------------------------------------------------------------------

    def _initialize(self) -> None:
        for m in self.modifiers:
            m.initialize(self.model, self.blocks)
        owner: dict[int, Target] = {}
        for m in self.modifiers:
            for t in m.all_targets():
                other = owner.setdefault(id(t.module), t)
                if other is not t:
                    raise ValueError(f"layer {t.name!r} is a target of both "
                                     f"{type(other.modifier).__name__} and {type(m).__name__}")
        if not owner:
            found = sorted({type(x).__name__ for b in self.blocks.modules for x in b.modules()
                            if is_quantizable(x)})
            raise ValueError(
                f"no module matched the recipe's targets inside the decoder blocks "
                f"{self.blocks.path!r} ({'; '.join(m.describe() for m in self.modifiers)}); "
                f"quantizable classes there: {found}")
        emb = (self.model.get_input_embeddings()
               if hasattr(self.model, "get_input_embeddings") else None)
        for m in self.modifiers:
            for t in m.outside:
                if emb is not None and t.module.weight is getattr(emb, "weight", None):
                    raise ValueError(
                        f"layer {t.name!r} shares its weight with the input embeddings "
                        "(tie_word_embeddings); quantizing it would also change the "
                        "embeddings. Untie the weights first or drop it from the targets")
        wants = [m for m in self.modifiers if m.needs_inputs and m.needs_float_inputs]
        for m in wants:
            if m.outside:
                raise ValueError(
                    f"layer {m.outside[0].name!r} is outside the decoder blocks, where "
                    f"{type(m).__name__} cannot get the float model's inputs it needs (the "
                    "float stream runs block by block); leave it out of the targets")
        # the float stream runs up to the last block with a target that needs it
        self.float_until = max((i + 1 for m in wants for i, ts in enumerate(m.per_block)
                                if ts), default=0)

    def _float_width(self) -> int:
        """The input features per token the float pass records in one block, at most."""
        return max(sum(int(linear_weight(t.module)[0].shape[1]) for m in self.modifiers
                       if m.needs_inputs and m.needs_float_inputs for t in m.per_block[i])
                   for i in range(len(self.blocks)))

    def _block_targets(self, i: int) -> list[Target]:
        return [t for m in self.modifiers for t in m.per_block[i]]

    def _block_kv(self, i: int) -> list[KVTarget]:
        return [k for m in self.modifiers for k in m.kv_per_block[i]]

    def _install_block_hooks(self, i: int) -> None:
        def add_pre(module: nn.Module, fn: Any, **kw: Any) -> None:
            self.hooks.pre("activations", module, fn, **kw)

        def add_post(module: nn.Module, fn: Any) -> None:
            self.hooks.post("activations", module, fn)

        for m in self.modifiers:
            m.install_block_hooks(i, add_pre, add_post)

    @property
    def _solve_now(self) -> bool:
        return all(m.sequential for m in self.modifiers if m.needs_inputs)

    # ---- the run --------------------------------------------------------------------------

    def run(self, calib: CalibrationSet) -> QuantizationReport:
        if len(calib) == 0:
            raise ValueError("the calibration set is empty")
        t_start = time.perf_counter()
        self._initialize()
        model = self.model
        was_training = model.training
        model.eval()
        reports: list[LayerReport] = []
        self.reports = reports  # what the block loops add to
        phases = {"capture": 0.0, "blocks": 0.0, "outside": 0.0}
        self.float_seconds = 0.0
        flow = _Flow([])
        try:
            with torch.no_grad():
                if not self._needs_data():
                    phases["blocks"] = self._run_without_data()
                    flow.paths = [NO_PASS] * len(self.blocks)
                else:
                    phases["capture"], phases["blocks"] = self._run_blocks(calib, flow, t_start)
                inside = self._solver_seconds()
                del flow.hiddens, flow.stacked
                t_out = time.perf_counter()
                reports += self._run_outside(calib)
                phases["outside"] = time.perf_counter() - t_out
                for m in self.modifiers:
                    m.end_calibration(model)
        except BaseException:
            for m in self.modifiers:
                m.abort()
            raise
        finally:
            self.hooks.close()
            self.calls = []
            model.train(was_training)

        hessian, solve = inside
        fl = self.float_seconds
        rep = QuantizationReport(
            reports, seconds=time.perf_counter() - t_start, num_samples=len(calib),
            num_tokens=calib.num_tokens, blocks=self.blocks.path, block_paths=flow.paths,
            phase_seconds={"capture": phases["capture"],
                           "forward": max(0.0, phases["blocks"] - hessian - solve - fl),
                           **({"float forward": fl} if self.float_until else {}),
                           "hessian": hessian, "solve": solve,
                           "outside blocks": phases["outside"]},
            kv_cache="; ".join(d for m in self.modifiers if (d := m.describe_kv())))
        model.fq_report = rep
        logger.info("ferroquant report\n%s", rep.table())
        return rep

    def _needs_data(self) -> bool:
        """Whether anything is calibrated: a modifier needing inputs, a KV cache or the float
        stream. Otherwise (round-to-nearest weights, dynamic activations) no forward is run."""
        return (any(m.needs_inputs for m in self.modifiers) or self.float_until > 0
                or any(self._block_kv(i) for i in range(len(self.blocks))))

    def _run_without_data(self) -> float:
        """Every block's targets quantized where they are, with no forward; seconds taken."""
        t0 = time.perf_counter()
        for m in self.modifiers:
            m.start_calibration(self.model)
        for i in tqdm(range(len(self.blocks)), desc="quantizing", unit="block",
                      disable=not self.show_progress):
            for m in self.modifiers:
                self.reports += m.on_block_start(i, m.per_block[i])
                m.on_block_end(i)
        return time.perf_counter() - t0

    def _run_blocks(self, calib: CalibrationSet, flow: _Flow, t_start: float
                    ) -> tuple[float, float]:
        """Captures the blocks' inputs and calibrates block by block; (capture, blocks)
        seconds."""
        model = self.model
        hiddens, self.calls = capture_block_inputs(model, self.blocks, calib, self.hooks)
        flow.hiddens = [h.to(self.dev, self.fdt) for h in hiddens]
        del hiddens
        capture = time.perf_counter() - t_start
        for m in self.modifiers:
            m.start_calibration(model)
        reserved = (memory.float_stream_bytes(flow.hiddens, self._float_width())
                    if self.float_until else 0)
        self.chunk, why = memory.batching_plan(model, self.blocks, flow.hiddens,
                                               self.dev, self.batched, reserved)
        n = len(flow.hiddens)
        lengths = [int(h.shape[-2]) for h in flow.hiddens]
        if self.chunk >= n > 1 and len(set(lengths)) > 1:
            padded = self._capture_padded(calib, lengths)
            flow.hiddens, flow.lengths = padded.hiddens, padded.lengths
        if self.float_until:  # block 0's float inputs are the same embeddings
            flow.floats = _Flow(list(flow.hiddens), lengths=flow.lengths)
        logger.info("ferroquant: %s (%s)", "one batched pass per block" if self.chunk >= n
                    else f"block passes per subset over chunks of {self.chunk} samples"
                    if self.chunk > 1 else "block passes per subset, sample by sample",
                    why)
        t_blocks = time.perf_counter()
        bar = tqdm(total=len(self.blocks), desc="calibrating", unit="block",
                   disable=not self.show_progress)
        try:
            for i in range(len(self.blocks)):
                self.reports += self._run_block(i, flow, bar)
                bar.update(1)
        finally:
            bar.close()
        return capture, time.perf_counter() - t_blocks

    def _capture_padded(self, calib: CalibrationSet, lengths: list[int]) -> _Flow:
        """Samples of different lengths, re-recorded as one right-padded batch so every block
        runs once over all of them; pad positions are kept out of every statistic."""
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        batch = padded_samples(calib, pad if isinstance(pad, int) and pad >= 0 else 0)
        hiddens, self.calls = capture_block_inputs(self.model, self.blocks, [batch], self.hooks)
        return _Flow([hiddens[0].to(self.dev, self.fdt)], lengths=lengths)

    def _solver_seconds(self) -> tuple[float, float]:
        """(statistics, solve) seconds the modifiers spent so far."""
        secs = [getattr(m, "seconds", {}) for m in self.modifiers]
        return (sum(x.get("hessian", 0.0) for x in secs), sum(x.get("solve", 0.0) for x in secs))

    # ---- one block ------------------------------------------------------------------------

    def _run_block(self, i: int, flow: _Flow, bar: Any) -> list[LayerReport]:
        bname, block = self.blocks.names[i], self.blocks.modules[i]
        targets = self._block_targets(i)
        kvs = self._block_kv(i)
        home = first_device(block)
        runner = block
        try:
            memo: dict[int, Any] = {}
            bcalls = [Call(to_device(c.args, self.dev, memo, self.fdt),
                           to_device(c.kwargs, self.dev, memo, self.fdt), c.hidden_key)
                      for c in self.calls[i]]
            floats = None
            if flow.floats is not None:  # before anything of the block is quantized
                block.to(self.dev)
                floats = self._float_pass(i, bname, block, targets, flow, bcalls, bar)
            reports: list[LayerReport] = []
            for m in self.modifiers:
                reports += m.on_block_start(i, [t for t in m.per_block[i] if not m.needs_inputs])
            calibrated = [t for t in targets if t.modifier.needs_inputs]
            block.to(self.dev)
            runner = self._forward_copy(block, targets, kvs, bname)
            self._install_block_hooks(i)
            done, why_not = None, ""
            if self.chunk >= len(flow.hiddens):
                bar.set_postfix_str(f"{bname} batched")
                done, why_not = self._batched(i, bname, runner, calibrated, kvs, flow, bcalls,
                                              floats)
            if done is not None:
                flow.paths.append("batched")
                reports += done
            else:
                reports += self._fallback(i, bname, runner, calibrated, kvs, flow, bcalls,
                                          why_not, bar, floats)
            self.calls[i] = []
            for m in self.modifiers:
                m.on_block_end(i)
            return reports
        finally:
            self.hooks.remove("activations")
            for t in targets:
                t.live = t.module
            for k in kvs:
                k.live = k.module
            del runner
            block.to(home)

    def _float_pass(self, i: int, bname: str, block: nn.Module, targets: list[Target],
                    flow: _Flow, bcalls: list[Call], bar: Any) -> FloatInputs | None:
        """Block ``i`` with its float weights over the float stream, batched as the quantized
        pass is: its outputs become the next float stream, and the inputs of its targets
        needing them are returned (None when none does)."""
        t0 = time.perf_counter()
        ff = flow.floats
        assert ff is not None
        bar.set_postfix_str(f"{bname} float")
        wanted = [t for t in targets if t.modifier.needs_inputs and t.modifier.needs_float_inputs]
        n = len(ff.hiddens)
        lengths: list[list[int] | None] | None = None
        hs, cs, sizes = ff.hiddens, bcalls, [1] * n
        if ff.lengths is not None:  # the one padded entry
            sizes, lengths = [len(ff.lengths)], [ff.lengths]
        elif self.chunk > 1:
            try:
                if self.chunk >= n:
                    h, c = batch_calls(ff.hiddens, bcalls, ff.stacked)
                    hs, cs, sizes = [h], [c], [n]
                else:
                    hs, cs, sizes = chunk_calls(ff.hiddens, bcalls, self.chunk)
            except Unbatchable:
                pass  # sample by sample, as the quantized pass will go
        runner = self._forward_copy(block, targets, [], bname)
        try:
            rec, outs = float_pass(runner, wanted, hs, cs, sizes, lengths, bname, self.hooks)
        finally:
            for t in targets:
                t.live = t.module
            del runner
        if ff.lengths is not None:
            ff.hiddens = outs
        elif len(outs) == 1 and n > 1:
            ff.stacked, ff.hiddens = outs[0], list(outs[0].split(1, 0))
        else:
            ff.stacked, ff.hiddens = None, [o[j:j + 1] for o in outs for j in range(o.shape[0])]
        if i + 1 >= self.float_until:
            flow.floats = None  # no later block needs the float stream
        self.float_seconds += time.perf_counter() - t0
        return rec if wanted else None

    def _batched(self, i: int, bname: str, runner: nn.Module, targets: list[Target],
                 kvs: list[KVTarget], flow: _Flow, bcalls: list[Call],
                 floats: FloatInputs | None) -> tuple[list[LayerReport] | None, str]:
        """The one-pass path; (reports, "") or (None, why it could not run) with the block's
        weights untouched."""
        if flow.lengths is not None:
            hidden, call = flow.hiddens[0], bcalls[0]
        else:
            try:
                hidden, call = batch_calls(flow.hiddens, bcalls, flow.stacked)
            except Unbatchable as e:
                return None, str(e)
        saved = {id(t.module): t.module.weight.detach().clone() for t in targets}
        op = OnePass(targets, f"block {bname}", self._solve_now, int(hidden.shape[0]),
                     flow.lengths, floats)
        op.install(self.hooks)
        for k in kvs:  # every sample reaches the cache in one call: calibrate, then quantize
            k.quant.observing = k.quant.freeze_on_call = True
            k.quant.lengths = flow.lengths
        try:
            out = call_block(runner, hidden, call)
        except StopForward:
            out = None
        finally:
            self.hooks.remove("one-pass")
        if op.unbatchable:
            for t in targets:  # undo what was solved before the block turned out unbatchable
                t.modifier.rollback(t, saved[id(t.module)])
            for k in kvs:
                k.quant.reset()
            return None, op.unbatchable
        del saved
        reports = op.finish()
        if out is None or (targets and not self._solve_now):
            out = call_block(runner, hidden, call)  # the outputs after quantization
        check_batch_finite(out, bname)
        if flow.lengths is not None:
            flow.hiddens = [out]
        else:
            flow.stacked = out
            flow.hiddens = list(out.split(1, 0))
        return reports, ""

    def _fallback(self, i: int, bname: str, runner: nn.Module, targets: list[Target],
                  kvs: list[KVTarget], flow: _Flow, bcalls: list[Call], why_not: str, bar: Any,
                  floats: FloatInputs | None) -> list[LayerReport]:
        """Subset by subset over single samples or chunks, then a pass for the outputs."""
        flow.stacked = None
        n = len(flow.hiddens)
        k = min(self.chunk, n)
        lengths: list[list[int] | None] | None = None
        if flow.lengths is not None:  # the one padded entry stays one call
            hs, cs, sizes, lengths = flow.hiddens, bcalls, [len(flow.lengths)], [flow.lengths]
            k = len(flow.lengths)
        else:
            try:
                hs, cs, sizes = (chunk_calls(flow.hiddens, bcalls, k) if k > 1
                                 else (flow.hiddens, bcalls, [1] * n))
            except Unbatchable as e:
                why_not = why_not or str(e)
                k, hs, cs, sizes = 1, flow.hiddens, bcalls, [1] * n
        path = "per-sample" if k == 1 else f"chunks of {k}"
        if why_not:
            path += f" ({why_not})"
            logger.info("ferroquant: block %r: %s", bname, path)
        flow.paths.append(path)
        reports: list[LayerReport] = []
        if targets:
            groups = execution_groups(runner, targets, hs[0], cs[0], self.hooks)
            subsets = [[g] for g in groups] if self._solve_now else [groups]
            kv_after = self._kv_after(kvs, subsets)

            def run(s: int) -> None:
                call_block(runner, hs[s], cs[s])

            if kv_after < 0:
                self._calibrate_kv(kvs, runner, hs, cs, lengths)
            for j, subset in enumerate(subsets):
                bar.set_postfix_str(f"{bname} subset {j + 1}/{len(subsets)}")
                calibrate_subsets(subset, f"block {bname}", run, len(hs), self.hooks, sizes,
                                  lengths, floats)
                reports += [t.modifier.on_module_ready(t, j) for g in subset for t in g]
                if j == kv_after:
                    self._calibrate_kv(kvs, runner, hs, cs, lengths)
        self._calibrate_kv(kvs, runner, hs, cs, lengths)  # a block with no weight targets
        bar.set_postfix_str(f"{bname} outputs")
        outs = []
        first = 0
        for h, c in zip(hs, cs):
            out = call_block(runner, h, c)
            check_batch_finite(out, bname, first)
            first += int(h.shape[0])
            outs.append(out)
        flow.hiddens = (outs if flow.lengths is not None
                        else [o[j:j + 1] for o in outs for j in range(o.shape[0])])
        return reports

    def _kv_after(self, kvs: list[KVTarget], subsets: list[list[list[Target]]]) -> int:
        """The subset after which the KV cache is calibrated on the per-subset path: once the
        attention's k_proj and v_proj are quantized (as the one-pass path sees them), or
        before the first subset (-1) when they are not targets or subsets are not solved in
        order."""
        if not kvs or not self._solve_now:
            return -1
        projections = {id(getattr(k.module, p, None)) for k in kvs for p in ("k_proj", "v_proj")}
        found = [j for j, sub in enumerate(subsets) for g in sub for t in g
                 if id(t.module) in projections]
        return max(found, default=-1)

    def _calibrate_kv(self, kvs: list[KVTarget], runner: nn.Module, hs: list[torch.Tensor],
                      cs: list[Call], lengths: list[list[int] | None] | None) -> None:
        """One pass over every call up to the last attention of the block, observing the keys
        and values the attentions cache; then their scales are frozen and quantization on."""
        pending = [k for k in kvs if not k.quant.frozen]
        if not pending:
            return
        waiting: set[int] = set()

        def reached(module: nn.Module, args: Any, output: Any) -> None:
            waiting.discard(id(module))
            if not waiting:
                raise StopForward

        for k in pending:
            k.quant.observing, k.quant.freeze_on_call = True, False
            self.hooks.post("kv-pass", k.live, reached)
        try:
            for s, (h, c) in enumerate(zip(hs, cs)):
                waiting.update(id(k.live) for k in pending)
                for k in pending:
                    k.quant.lengths = lengths[s] if lengths else None
                try:
                    call_block(runner, h, c)
                except StopForward:
                    pass
        finally:
            self.hooks.remove("kv-pass")
        for k in pending:
            if k.quant.k.batches:  # one never reached is reported at the block's end
                k.quant.freeze()

    def _forward_copy(self, block: nn.Module, targets: list[Target], kvs: list[KVTarget],
                      bname: str) -> nn.Module:
        """The module the block's calibration forwards run: ``block`` itself, or - when
        ``forward_dtype`` differs from its floating parameters - a copy with those cast to it,
        whose target modules become the targets' ``live`` modules. Buffers keep their dtype:
        they are tables (rotary frequencies, masks) whose precision the model's own code
        manages."""
        dtype = self.fdt
        floats = [p for p in block.parameters() if p.is_floating_point()]
        if dtype is None or all(p.dtype == dtype for p in floats):
            return block
        try:
            runner = copy.deepcopy(block)
        except Exception as e:  # any failure to copy: say which block and why
            raise RuntimeError(
                f"forward_dtype={str(dtype).removeprefix('torch.')!r}: block {bname!r} cannot "
                f"be copied to run in that dtype ({type(e).__name__}: {e}); leave "
                "forward_dtype unset") from e
        for p in runner.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        mods = dict(runner.named_modules(prefix=bname))
        for t in targets:
            t.live = mods[t.name]
        for k in kvs:
            k.live = mods[k.name]
        return runner

    # ---- outside the blocks ---------------------------------------------------------------

    def _run_outside(self, calib: CalibrationSet) -> list[LayerReport]:
        """Modules outside the blocks (an explicitly targeted ``lm_head``): full-model
        forwards, so their inputs carry every block's quantization error."""
        targets = [t for m in self.modifiers for t in m.outside]
        if not targets:
            return []
        reports: list[LayerReport] = []
        for m in self.modifiers:
            reports += m.on_block_start(-1, [t for t in m.outside if not m.needs_inputs])
        calibrated = [t for t in targets if t.modifier.needs_inputs]
        if calibrated:
            samples = list(calib)

            def run(s: int) -> None:
                forward_model(self.model, model_inputs(self.model, samples[s]))

            calibrate_subsets([[t] for t in calibrated], "outside the decoder blocks", run,
                              len(samples), self.hooks)
            reports += [t.modifier.on_module_ready(t, 0) for t in calibrated]
        return reports
