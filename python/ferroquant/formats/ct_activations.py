"""compressed-tensors' activation and KV-cache quantization in a checkpoint: the config's
``input_activations`` / ``output_activations`` / ``kv_cache_scheme`` arguments, and the static
scales stored beside the weights, written from and read back into
:class:`~ferroquant.activations.ActivationQuantizer` / :class:`~ferroquant.activations.KVCacheQuantizer`.

Tensors (shapes as ``compressed_tensors.quantization.lifecycle.initialize`` creates them), in
the model dtype, for static schemes only (dynamic ones compute their scales at run time):

- ``<layer>.input_scale`` ``[1]`` (and ``input_zero_point`` ``[1]``, int8, when asymmetric);
  ``output_scale`` / ``output_zero_point`` likewise;
- ``<attention>.k_scale`` / ``v_scale``: ``[1]`` per tensor, ``[kv_heads, 1, 1]`` per head
  (``attn_head``); the KV cache is symmetric, so no zero points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..activations import ActivationQuantizer, KVCacheQuantizer, attention_like, attention_modules
from ..config import ActivationArgs
from .common import CheckpointError, CheckpointFiles

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_POINT_DTYPE = torch.int8  # compressed-tensors' zp_dtype for integer codes up to 8 bits


def args_dict(a: ActivationArgs) -> dict[str, Any]:
    """``a`` as compressed-tensors serialises its ``QuantizationArgs`` (the observer only for
    a static scheme; ``dynamic`` a plain bool: "local" is compressed-tensors' tensor-group
    flavour, which ferroquant's dynamic scales are not)."""
    d: dict[str, Any] = {
        "num_bits": int(a.num_bits),
        "type": a.type,
        "symmetric": bool(a.symmetric),
        "group_size": int(a.group_size) if a.strategy == "group" else None,
        "strategy": a.strategy,
        "dynamic": bool(a.dynamic),
    }
    if not a.dynamic:
        d["observer"] = a.observer_name
    if a.observer_kwargs:
        d["observer_kwargs"] = dict(a.observer_kwargs)
    return d


# ---------------------------------------------------------------------------------------------
# writing


def quantizer_tensors(prefix: str, base: str, q: ActivationQuantizer | None,
                      scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``<prefix>.<base>_scale`` (and ``_zero_point``) of a static quantizer; nothing for a
    dynamic one."""
    if q is None or q.args.dynamic:
        return {}
    if q.scale is None:
        raise CheckpointError(f"{prefix}: the static {base} scale ({q.args.describe()}) was "
                              "never calibrated; nothing to save")
    expected = (1,) if q.args.strategy == "tensor" else (-1, 1, 1)
    scale = q.scale.detach().cpu()
    if scale.dim() != len(expected) or any(e not in (-1, s) for e, s in zip(expected, scale.shape)):
        raise CheckpointError(f"{prefix}: {base} scale of shape {list(scale.shape)} for strategy "
                              f"{q.args.strategy!r}")
    out = {f"{prefix}.{base}_scale": scale.to(scale_dtype).contiguous()}
    if not q.args.symmetric:
        if q.zero_point is None:
            raise CheckpointError(f"{prefix}: asymmetric {base} quantization without a zero point")
        out[f"{prefix}.{base}_zero_point"] = (
            q.zero_point.detach().cpu().reshape(scale.shape).to(ZERO_POINT_DTYPE).contiguous())
    return out


def kv_tensors(prefix: str, kv: KVCacheQuantizer, scale_dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    """``<prefix>.k_scale`` and ``<prefix>.v_scale`` of an attention module."""
    return {**quantizer_tensors(prefix, "k", kv.k, scale_dtype),
            **quantizer_tensors(prefix, "v", kv.v, scale_dtype)}


def model_kv(model: nn.Module) -> dict[str, KVCacheQuantizer]:
    """The attention modules carrying a KV-cache quantizer, by name."""
    return {n: m.__dict__["fq_kv"] for n, m in model.named_modules() if "fq_kv" in m.__dict__}


def kv_scheme(kvs: dict[str, KVCacheQuantizer]) -> ActivationArgs | None:
    """The one ``kv_cache_scheme`` every attention module's quantizers follow (a checkpoint has
    one), or None without any."""
    schemes = {args_key(q.args): q.args for kv in kvs.values() for q in (kv.k, kv.v)}
    if len(schemes) > 1:
        raise CheckpointError("the attention modules' KV-cache quantizers differ "
                              f"({', '.join(a.describe() for a in schemes.values())}); a "
                              "compressed-tensors checkpoint has one kv_cache_scheme")
    return next(iter(schemes.values()), None)


def args_key(a: ActivationArgs | None) -> str:
    return "" if a is None else repr(sorted(args_dict(a).items()))


# ---------------------------------------------------------------------------------------------
# reading


def read_quantizer(files: CheckpointFiles, prefix: str, base: str, args: ActivationArgs,
                   shape: tuple[int, ...], why: str, device: torch.device | str = "cpu"
                   ) -> tuple[ActivationQuantizer, list[str]]:
    """The enabled quantizer of ``<prefix>``'s ``base`` tensor, and the checkpoint tensors it
    consumed; a static scheme's scale (and zero point) must be there, with ``shape``."""
    if args.dynamic:
        return ActivationQuantizer(args, enabled=True), []
    names = [f"{prefix}.{base}_scale"]
    files.expect(names[0], SCALE_DTYPES, shape, why)
    scale = files.get(names[0]).to(device)
    zero = None
    if not args.symmetric:
        names.append(f"{prefix}.{base}_zero_point")
        files.expect(names[1], (torch.int8, torch.int32), shape, why)
        zero = files.get(names[1]).to(device=device, dtype=torch.int32)
    return ActivationQuantizer(args, scale=scale, zero_point=zero, enabled=True), names


def kv_heads(model: nn.Module) -> int:
    """The number of KV heads (per-head scales have one each), from the model's config."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    n = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    if not n:
        raise CheckpointError("kv_cache_scheme per head (attn_head): the model's config has no "
                              "num_key_value_heads")
    return int(n)


def read_kv(files: CheckpointFiles, model: nn.Module, args: ActivationArgs, source: str,
            device: torch.device | str = "cpu") -> tuple[dict[str, KVCacheQuantizer], list[str]]:
    """A :class:`KVCacheQuantizer` per attention module from ``k_scale``/``v_scale``, and the
    tensors consumed. A model without k_proj/v_proj attention, or a missing scale, is an error
    naming what was found."""
    attn = attention_modules(model)
    if not attn:
        seen = attention_like(model)
        raise CheckpointError(
            f"{source}: kv_cache_scheme ({args.describe()}) but the model has no attention "
            "module with k_proj and v_proj children and a past_key_values argument to carry "
            "k_scale/v_scale" + (f"; attention-like modules: {'; '.join(seen[:3])}" if seen else ""))
    shape = (1,) if args.strategy == "tensor" else (kv_heads(model), 1, 1)
    why = f"kv_cache_scheme {args.describe()} from {source}"
    out: dict[str, KVCacheQuantizer] = {}
    consumed: list[str] = []
    for name, _ in attn:
        k, kn = read_quantizer(files, name, "k", args, shape, why, device)
        v, vn = read_quantizer(files, name, "v", args, shape, why, device)
        out[name] = KVCacheQuantizer(k, v)
        consumed += kn + vn
    return out, consumed
