"""Activation and KV-cache quantization as it runs in a forward: the fake quantization of a
quantized module's inputs and outputs and of the keys and values an attention module caches,
the static scales' calibration through the Rust observers, and the hooks that carry it all.

The arithmetic is compressed-tensors' (so a checkpoint loaded by transformers with the
``compressed-tensors`` package computes what ferroquant computes): in the tensor's own dtype,
``q = clamp(round(x / s) + z, qmin, qmax)``, ``x' = (q - z) * s`` with round half to even and
signed codes ``[-2^(b-1), 2^(b-1) - 1]``; FP8 casts ``clamp(x / s, -448, 448)`` to E4M3.
Dynamic scales come from each tensor as it flows: ``absmax / ((qmax - qmin) / 2)`` symmetric
(``absmax / 448`` for FP8), ``(max - min) / (qmax - qmin)`` with a zero point asymmetric, per
token (each row of ``[..., features]``), per tensor or per group of features; ranges always
include 0 and a zero scale becomes the dtype's eps.

A quantized module carries :class:`ActivationQuantizer` objects as ``module.fq_input`` /
``module.fq_output``; an attention module carries a :class:`KVCacheQuantizer` as
``module.fq_kv``, applied where the attention hands its keys and values (after the rotary
embedding) to the cache, as compressed-tensors does. :func:`attach` installs the hooks that
read them; :func:`detach` removes them again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ActivationArgs

__all__ = [
    "ActivationQuantizer",
    "KVCacheQuantizer",
    "attach",
    "attention_modules",
    "detach",
    "fake_quantize",
    "qrange",
]

INPUT, OUTPUT, KV = "fq_input", "fq_output", "fq_kv"
_HANDLES = "_fq_act_handles"
# recipe observer names -> the Rust core's (llm-compressor's ``minmax`` is a moving average)
_CORE_OBSERVER = {"minmax": "moving_average_minmax", "moving_average_minmax":
                  "moving_average_minmax", "static_minmax": "static_minmax", "mse": "mse"}


def qrange(args: ActivationArgs) -> tuple[float, float]:
    """The code range: signed ints ``[-2^(b-1), 2^(b-1) - 1]``, FP8 E4M3 ``[-448, 448]``."""
    if args.type == "float":
        m = float(torch.finfo(torch.float8_e4m3fn).max)
        return -m, m
    return float(-(1 << (args.num_bits - 1))), float((1 << (args.num_bits - 1)) - 1)


def _dynamic_params(x: torch.Tensor, args: ActivationArgs
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scale, zero point or None, x reshaped so they broadcast) from ``x`` itself."""
    if args.strategy == "group":
        gs = int(args.group_size)  # type: ignore[arg-type]
        if x.shape[-1] % gs:
            raise ValueError(f"dynamic group activations: {x.shape[-1]} features are not a "
                             f"multiple of group_size={gs}")
        x = x.unflatten(-1, (x.shape[-1] // gs, gs))
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    elif args.strategy == "token":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:  # tensor
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    return (*_scale_zero(lo, hi, args), x)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, args: ActivationArgs
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    qmin, qmax = qrange(args)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    span = torch.tensor(qmax - qmin, dtype=lo.dtype, device=lo.device)
    scale = (torch.maximum(lo.abs(), hi.abs()) / (span / 2) if args.symmetric
             else (hi - lo) / span)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    scale = torch.where(scale == 0, eps, scale)
    zero = None if args.symmetric else torch.clamp(qmin - lo / scale, qmin, qmax).round()
    return scale, zero


def fake_quantize(x: torch.Tensor, args: ActivationArgs, scale: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` as compressed-tensors does (see the module docstring):
    with ``args.dynamic`` the scales come from ``x``; otherwise ``scale`` (and ``zero_point``
    when asymmetric) are the calibrated ones - one value, or one per KV head for ``x`` shaped
    ``[batch, heads, seq, head_dim]``."""
    if x.numel() == 0:
        return x
    shape = x.shape
    if args.dynamic:
        scale, zero, xs = _dynamic_params(x, args)
    else:
        if scale is None:
            raise RuntimeError("a static activation scheme was used before it was calibrated")
        scale = scale.to(x.dtype)
        zero = None if zero_point is None else zero_point.to(x.dtype)
        xs = x
    qmin, qmax = qrange(args)
    scaled = xs / scale
    if zero is not None:
        scaled = scaled + zero
    scaled = scaled.clamp(qmin, qmax)
    if args.type == "float":
        q = scaled.to(torch.float8_e4m3fn).to(x.dtype)
    else:
        q = scaled.round()
    if zero is not None:
        q = q - zero
    return (q * scale).reshape(shape)


def _observer(args: ActivationArgs, columns: int) -> Any:
    from .observers import Observer  # the Rust core, loaded only when something is calibrated

    kw = dict(args.observer_kwargs)
    return Observer(columns, _CORE_OBSERVER[args.observer_name], strategy="tensor",
                    type=args.type, num_bits=args.num_bits, symmetric=args.symmetric, **kw)


@dataclass(eq=False)
class ActivationQuantizer:
    """How one tensor kind of one module is quantized: ``args``, and for a static scheme the
    calibrated ``scale`` (``[1]``, or ``[heads, 1, 1]`` per KV head) and ``zero_point``.

    While a static scheme calibrates, :meth:`observe` folds batches into the Rust observer(s)
    (one per KV head for ``attn_head``); :meth:`freeze` turns them into the scale, rounded to
    the dtype the checkpoint stores it in. ``enabled`` turns the fake quantization on: a
    module's activations are quantized from the moment the module itself is."""

    args: ActivationArgs
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    enabled: bool = False
    heads: int = 1
    batches: int = 0
    _observers: list[Any] = field(default_factory=list, repr=False)

    @property
    def calibrated(self) -> bool:
        return bool(self.args.dynamic) or self.scale is not None

    def reset(self) -> None:
        """Back to uncalibrated and off (a pass that was abandoned)."""
        self.scale = self.zero_point = None
        self.enabled = False
        self.batches = 0
        self._observers = []

    def observe(self, x: torch.Tensor) -> None:
        """One batch: ``[tokens, features]`` rows, or ``[heads, tokens, head_dim]`` for a
        per-head KV scheme (every head's observer sees its own slice)."""
        if self.args.dynamic or x.numel() == 0:
            return
        per_head = self.args.strategy == "attn_head"
        parts = list(x) if per_head else [x]
        if not self._observers:
            self._observers = [_observer(self.args, int(x.shape[-1])) for _ in parts]
            self.heads = len(parts)
        if len(parts) != len(self._observers):
            raise ValueError(f"expected {len(self._observers)} KV heads, got {len(parts)}")
        for obs, p in zip(self._observers, parts):
            obs.update(p.reshape(-1, p.shape[-1]))
        self.batches += 1

    def freeze(self, dtype: torch.dtype) -> None:
        """Scales (and zero points) from the observers, rounded to ``dtype``; observers dropped.
        Zero batches seen is an error: a static scale needs calibration data."""
        if self.args.dynamic or self.scale is not None:
            return
        if not self._observers:
            raise ValueError("a static activation scale saw no calibration token")
        scales, zeros = zip(*(o.scale_zero_point() for o in self._observers))
        s = torch.cat([x.reshape(1) for x in scales])
        z = torch.cat([x.reshape(1) for x in zeros])
        if self.args.strategy == "attn_head":
            s, z = s.view(-1, 1, 1), z.view(-1, 1, 1)
        self.scale = s.to(dtype)
        self.zero_point = None if self.args.symmetric else z.to(torch.int32)
        self._observers = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quantize(x, self.args, self.scale, self.zero_point)


@dataclass(eq=False)
class KVCacheQuantizer:
    """The keys' and values' quantizers of one attention module. ``observing`` (set while its
    block calibrates) makes the cache hook feed the observers - per sample, pad positions
    excluded (``lengths``) - and ``freeze_on_call`` freezes and enables them right after the
    first call that saw every sample (the one-pass path)."""

    k: ActivationQuantizer
    v: ActivationQuantizer
    observing: bool = False
    freeze_on_call: bool = False
    lengths: list[int] | None = None
    storage_dtype: torch.dtype = torch.float32

    @classmethod
    def for_args(cls, args: ActivationArgs) -> KVCacheQuantizer:
        return cls(ActivationQuantizer(args), ActivationQuantizer(args))

    @property
    def frozen(self) -> bool:
        return self.k.calibrated and self.v.calibrated

    def _observe(self, q: ActivationQuantizer, x: torch.Tensor) -> None:
        # x: [batch, heads, seq, head_dim]; batch = the stacked samples of this call
        per_head = q.args.strategy == "attn_head"
        for i in range(x.shape[0]):
            xi = x[i] if self.lengths is None else x[i, :, : self.lengths[i]]
            q.observe(xi if per_head else xi.reshape(-1, xi.shape[-1]))

    def reset(self) -> None:
        for q in (self.k, self.v):
            q.reset()
        self.observing = self.freeze_on_call = False

    def freeze(self) -> None:
        for q in (self.k, self.v):
            q.freeze(self.storage_dtype)
            q.enabled = True
        self.observing = False

    def __call__(self, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observing:
            self._observe(self.k, key.detach())
            self._observe(self.v, value.detach())
            if self.freeze_on_call:
                self.freeze()
        return self.k(key), self.v(value)


class _CacheProxy:
    """Stands in for the attention's ``past_key_values`` for one call: keys and values pass
    through the quantizer, then into the real cache when there is one."""

    def __init__(self, quantizer: KVCacheQuantizer, cache: Any) -> None:
        self._quantizer = quantizer
        self._cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_states, value_states = self._quantizer(key_states, value_states)
        if self._cache is None:
            return key_states, value_states
        return self._cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # everything else is the real cache's
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


# what attention modules call their cache argument (transformers renamed it over time)
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")


def _cache_kwarg(module: nn.Module) -> str | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((a for a in _CACHE_ARGS if a in params), None)


def kv_hook(get: Callable[[nn.Module], KVCacheQuantizer | None]
            ) -> Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]:
    """A forward pre-hook (``with_kwargs=True``) putting the cache proxy in front of the
    attention's cache; ``get(module)`` finds the quantizer."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        q = get(module)
        name = _cache_kwarg(module)
        if q is not None and name is not None:
            kwargs[name] = _CacheProxy(q, kwargs.get(name))
        return args, kwargs

    return hook


def attention_modules(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The attention modules whose keys and values are cached: modules with both a ``k_proj``
    and a ``v_proj`` child and a cache argument (``cache``, ``past_key_values``)."""
    return [(name, m) for name, m in root.named_modules(prefix=prefix)
            if isinstance(getattr(m, "k_proj", None), nn.Module)
            and isinstance(getattr(m, "v_proj", None), nn.Module)
            and _cache_kwarg(m) is not None]


def attention_like(model: nn.Module) -> list[str]:
    """Names and classes of modules that look like attention, for error messages."""
    seen = []
    for name, m in model.named_modules():
        if "attention" in type(m).__name__.lower() or name.rsplit(".", 1)[-1] in (
                "attn", "self_attn", "attention"):
            kids = [n for n, _ in m.named_children()]
            seen.append(f"{name} ({type(m).__name__}: {', '.join(kids) or 'no children'})")
    return seen


def _input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    q = module.__dict__.get(INPUT)
    if q is None or not q.enabled or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (q(args[0]), *args[1:])


def _output_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    q = module.__dict__.get(OUTPUT)
    if q is None or not q.enabled or not isinstance(output, torch.Tensor):
        return None
    return q(output)


def input_hook(q: ActivationQuantizer) -> Callable[..., tuple[Any, ...] | None]:
    """A forward pre-hook applying ``q`` to a module's first argument (calibration copies)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not q.enabled or not args or not isinstance(args[0], torch.Tensor):
            return None
        return (q(args[0]), *args[1:])

    return hook


def output_hook(q: ActivationQuantizer) -> Callable[..., Any]:
    """A forward hook applying ``q`` to a module's output (calibration copies)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not q.enabled or not isinstance(output, torch.Tensor):
            return None
        return q(output)

    return hook


def attach(module: nn.Module, *, input: ActivationQuantizer | None = None,
           output: ActivationQuantizer | None = None,
           kv: KVCacheQuantizer | None = None) -> None:
    """Makes ``module`` quantize what is given for good: its input, its output, or (an
    attention module) its cached keys and values. Idempotent; :func:`detach` undoes it."""
    handles: dict[str, Any] = module.__dict__.setdefault(_HANDLES, {})
    if input is not None:
        module.__dict__[INPUT] = input
        if INPUT not in handles:
            handles[INPUT] = module.register_forward_pre_hook(_input_hook)
    if output is not None:
        module.__dict__[OUTPUT] = output
        if OUTPUT not in handles:
            handles[OUTPUT] = module.register_forward_hook(_output_hook)
    if kv is not None:
        module.__dict__[KV] = kv
        if KV not in handles:
            handles[KV] = module.register_forward_pre_hook(
                kv_hook(lambda m: m.__dict__.get(KV)), with_kwargs=True)


def detach(root: nn.Module) -> int:
    """Removes every activation/KV quantizer and hook :func:`attach` put under ``root``;
    returns how many modules had some."""
    n = 0
    for m in root.modules():
        handles = m.__dict__.pop(_HANDLES, None)
        if handles is None:
            continue
        n += 1
        for h in handles.values():
            h.remove()
        for attr in (INPUT, OUTPUT, KV):
            m.__dict__.pop(attr, None)
    return n
