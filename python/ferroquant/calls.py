"""Block calls: recording every decoder block's inputs from calibration samples, and stacking
per-sample calls into one batched call (or chunks of samples).

A recorded call keeps the block's positional and keyword arguments apart from its hidden
states, so the same call can be replayed on the block's (quantized) inputs. KV caches are
disabled (``use_cache=False``, cache objects replaced by ``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import Blocks
from .calibration import CalibrationSet
from .hooks import HookRegistry, StopForward

__all__ = [
    "Call",
    "NonFiniteActivationError",
    "Unbatchable",
    "batch_calls",
    "call_block",
    "capture_block_inputs",
    "check_batch_finite",
    "check_finite",
    "chunk_calls",
    "first_device",
    "forward_model",
    "model_inputs",
    "padded_samples",
    "to_device",
]


class NonFiniteActivationError(FloatingPointError):
    """NaN/Inf in the activations feeding a layer (or leaving a block)."""


def to_device(obj: Any, device: torch.device, memo: dict[int, Any],
        dtype: torch.dtype | None = None) -> Any:
    """Moves tensors inside tuples/lists/dicts to ``device`` (floating ones also to ``dtype``
    when given), keeping shared tensors shared."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            cast = dtype if dtype is not None and obj.is_floating_point() else None
            memo[key] = obj.to(device, cast)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(to_device(x, device, memo, dtype) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device, memo, dtype) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo, dtype) for k, v in obj.items()}
    return obj


def _cache_types() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import Cache

        return (Cache,)
    except ImportError:
        return ()


_CACHE_TYPES = _cache_types()


def _no_cache(obj: Any) -> Any:
    return None if _CACHE_TYPES and isinstance(obj, _CACHE_TYPES) else obj


def first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def check_finite(x: torch.Tensor, what: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteActivationError(
            f"{what} contain non-finite values ({n_nan} NaN, {n_inf} Inf of {x.numel()}); the "
            "model overflows in its dtype on this data - try float32/bfloat16 (the model's dtype "
            "or the recipe's forward_dtype) or check the weights and calibration text"
        )


@dataclass
class Call:
    """One recorded block call: hidden states go in ``args[0]`` or ``kwargs[hidden_key]``."""

    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: hidden states are the first positional argument


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[torch.Tensor, Call]:
    if args:
        hidden, rest, key = args[0], tuple(_no_cache(a) for a in args[1:]), None
        kw = dict(kwargs)
    elif "hidden_states" in kwargs:
        kw = dict(kwargs)
        hidden, rest, key = kw.pop("hidden_states"), (), "hidden_states"
    else:
        raise RuntimeError(
            "a decoder block was called without positional arguments or a 'hidden_states' "
            f"keyword (keywords: {sorted(kwargs)}); cannot tell which input is the hidden state"
        )
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"a decoder block's first input is a {type(hidden).__name__}, "
                        "expected the hidden-state tensor")
    for k in list(kw):
        kw[k] = _no_cache(kw[k])
    if "use_cache" in kw:
        kw["use_cache"] = False
    return hidden, Call(rest, kw, key)


def call_block(block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    if call.hidden_key is None:
        out = block(hidden, *call.args, **call.kwargs)
    else:
        out = block(*call.args, **{**call.kwargs, call.hidden_key: hidden})
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


def model_inputs(model: nn.Module, sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dev = first_device(emb) if emb is not None else first_device(model)
    return {k: v.to(dev) for k, v in sample.items()}


def forward_model(model: nn.Module, inputs: dict[str, Any]) -> Any:
    try:
        return model(**inputs, use_cache=False)
    except TypeError as e:
        if "use_cache" not in str(e):
            raise
        return model(**inputs)


def capture_block_inputs(model: nn.Module, blocks: Blocks,
                         calib: Iterable[dict[str, torch.Tensor]],
                         hooks: HookRegistry | None = None,
                         ) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Block-0 hidden states per sample and every block's call (args/kwargs) per sample.

    Each block's ``forward`` is replaced (through ``hooks``, which restores it) by a recorder
    that stores the call and passes the hidden states through; the last block's recorder ends
    the forward, so nothing after it (final norm, ``lm_head``) runs."""
    n_blocks = len(blocks)
    hiddens: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in range(n_blocks)]
    tuple_len: list[int | None] = [None]  # block output structure, learned from block 0

    def recorder(i: int, real_forward: Callable[..., Any]) -> Callable[..., Any]:
        def fwd(*args: Any, **kwargs: Any) -> Any:
            hidden, call = _split_call(args, kwargs)
            calls[i].append(call)
            if i == 0:
                hiddens.append(hidden)
                if tuple_len[0] is None:
                    # learn the output structure of a block once (a tensor or a tuple)
                    if call.hidden_key is None:
                        out = real_forward(hidden, *call.args, **call.kwargs)
                    else:
                        out = real_forward(*call.args, **{**call.kwargs, call.hidden_key: hidden})
                    tuple_len[0] = len(out) if isinstance(out, (tuple, list)) else 0
            if i == n_blocks - 1:
                raise StopForward
            n = tuple_len[0] or 0
            return (hidden,) + (None,) * (n - 1) if n else hidden
        return fwd

    registry = hooks if hooks is not None else HookRegistry()
    try:
        for i, b in enumerate(blocks.modules):
            registry.replace_forward("capture", b, recorder(i, b.forward))
        for s, sample in enumerate(calib):
            try:
                forward_model(model, model_inputs(model, sample))
            except StopForward:
                pass
            for i in range(n_blocks):
                if len(calls[i]) != s + 1:
                    raise RuntimeError(
                        f"block {blocks.names[i]!r} was called {len(calls[i]) - s} times for "
                        f"calibration sample {s} (expected once); the model does not run its "
                        "blocks once each in order - pass sequential_targets explicitly"
                    )
    finally:
        registry.remove("capture")
    for s, h in enumerate(hiddens):
        check_finite(h, f"the embeddings (input of block {blocks.names[0]!r}) for sample {s}")
    return hiddens, calls


def padded_samples(calib: CalibrationSet, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """All calibration samples as one right-padded batch (``input_ids`` and ``attention_mask``
    ``[n, longest]``): real tokens keep their positions and, under a causal mask, never see a
    pad, so their activations are those of the sample run alone."""
    n, longest = len(calib), max(int(x.shape[-1]) for x in calib.input_ids)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for s, (x, m) in enumerate(zip(calib.input_ids, calib.attention_mask)):
        ids[s, :x.shape[-1]] = x[0]
        mask[s, :m.shape[-1]] = m[0]
    return {"input_ids": ids, "attention_mask": mask}


class Unbatchable(Exception):
    """The block cannot run the batched path (the message says why); the per-sample path does."""


def _merge(values: list[Any], where: str) -> Any:
    """One call argument for the stacked batch, from its per-sample values: a tensor equal in
    every sample (causal mask, rotary tables of the same positions) is kept once and
    broadcasts; per-sample tensors ``[1, ...]`` are concatenated along dim 0; containers are
    merged item by item; anything else must be equal in every sample."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise Unbatchable(f"{where} is a tensor for some samples only")
        like = all(v.shape == first.shape and v.dtype == first.dtype and v.device == first.device
                   for v in values)
        if all(v is first for v in values) or (like and all(torch.equal(v, first)
                                                            for v in values[1:])):
            return first
        if not like or first.dim() == 0 or first.shape[0] != 1:
            shapes = sorted({tuple(v.shape) for v in values})[:3]
            raise Unbatchable(f"{where} differs between samples and has no batch dimension "
                               f"of 1 to stack on (shapes {shapes})")
        return torch.cat(values, 0)
    if isinstance(first, (tuple, list)) and type(first) in (tuple, list):
        if not all(type(v) is type(first) and len(v) == len(first) for v in values):
            raise Unbatchable(f"{where} has a different structure between samples")
        return type(first)(_merge([v[j] for v in values], f"{where}[{j}]")
                           for j in range(len(first)))
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise Unbatchable(f"{where} has different keys between samples")
        return {k: _merge([v[k] for v in values], f"{where}[{k!r}]") for k in first}
    for v in values[1:]:
        if v is first:
            continue
        if isinstance(v, torch.Tensor):
            raise Unbatchable(f"{where} is a tensor for some samples only")
        try:
            same = bool(v == first)
        except Exception:  # noqa: BLE001 - objects without a usable ==: not batchable
            same = False
        if not same:
            raise Unbatchable(f"{where} differs between samples ({first!r} vs {v!r})"[:200])
    return first


def batch_calls(hiddens: list[torch.Tensor], calls: list[Call],
                 stacked: torch.Tensor | None = None) -> tuple[torch.Tensor, Call]:
    """All samples' calls as one call with the hidden states stacked along dim 0
    (``stacked``: that stack, when the previous block already produced it)."""
    shapes = {tuple(h.shape) for h in hiddens}
    if len(shapes) != 1:
        raise Unbatchable(f"samples have different hidden-state shapes ({len(shapes)} kinds, "
                           f"e.g. {sorted(shapes)[:3]})")
    shape = next(iter(shapes))
    if len(shape) < 2 or shape[0] != 1:
        raise Unbatchable(f"hidden states of shape {list(shape)} (expected [1, seq, hidden])")
    if len({c.hidden_key for c in calls}) != 1 or len({len(c.args) for c in calls}) != 1 \
            or len({tuple(sorted(c.kwargs)) for c in calls}) != 1:
        raise Unbatchable("samples call the block with different arguments")
    c0 = calls[0]
    args = tuple(_merge([c.args[j] for c in calls], f"positional argument {j + 1}")
                 for j in range(len(c0.args)))
    kwargs = {k: _merge([c.kwargs[k] for c in calls], f"keyword argument {k!r}")
              for k in c0.kwargs}
    if stacked is None:
        stacked = torch.cat(hiddens, 0) if len(hiddens) > 1 else hiddens[0]
    return stacked, Call(args, kwargs, c0.hidden_key)


def chunk_calls(hiddens: list[torch.Tensor], calls: list[Call], k: int
                 ) -> tuple[list[torch.Tensor], list[Call], list[int]]:
    """The samples stacked ``k`` at a time (the last chunk may be smaller)."""
    hs, cs, sizes = [], [], []
    for j in range(0, len(hiddens), k):
        h, c = batch_calls(hiddens[j:j + k], calls[j:j + k])
        hs.append(h)
        cs.append(c)
        sizes.append(min(k, len(hiddens) - j))
    return hs, cs, sizes


def check_batch_finite(out: torch.Tensor, bname: str, first: int = 0) -> None:
    """Block outputs of stacked samples ``first, first + 1, ...``: NaN/Inf names the sample."""
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        for s in range(out.shape[0]):
            check_finite(out[s:s + 1], f"the outputs of block {bname!r} for sample {first + s}")
        check_finite(out, f"the outputs of block {bname!r}")
