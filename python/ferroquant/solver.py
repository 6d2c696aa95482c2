"""Typed torch-facing wrapper over ferroquant._core, used by the pipeline and the formats.

Tensors cross into Rust as numpy views without copies where the input is already a contiguous
CPU tensor of the dtype the core reads (float32 weights/Hessians, fp32/fp16/bf16 activations,
uint8 codes, int32 words); anything else is converted once. bf16 has no numpy dtype, so it
travels as its int16 bit pattern plus a dtype flag. CUDA tensors are moved to the CPU and the
results moved back to the input's device (the CUDA path is a later issue).

Errors from the core keep their type (``ValueError``, ``OSError``,
``HessianNotPositiveDefiniteError`` - a ``RuntimeError``); with ``name=`` the message is prefixed
``layer '<name>': ``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ferroquant import _core
from ferroquant._core import HessianNotPositiveDefiniteError

__all__ = [
    "HessianAccumulator",
    "HessianNotPositiveDefiniteError",
    "LayerQuantResult",
    "available_threads",
    "fp8_quantize",
    "gptq_quantize",
    "pack_ct_weight",
    "pack_ct_zero_point",
    "pack_gptq_qweight",
    "pack_gptq_qzeros",
    "rtn_quantize",
    "set_num_threads",
    "unpack_ct_weight",
    "unpack_ct_zero_point",
    "unpack_gptq_qweight",
    "unpack_gptq_qzeros",
    "write_safetensors",
]


@dataclass
class LayerQuantResult:
    codes: torch.Tensor  # uint8 [out, in], original column order
    scales: torch.Tensor  # float32 [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    dequantized: torch.Tensor  # float32 [out, in]
    loss: float  # tr((W-Q) H (W-Q)^T), undamped H
    damp_frac: float
    damp_attempts: list[float]
    dead_columns: list[int]
    perm: torch.Tensor | None


# --------------------------------------------------------------------------------------------
# conversion helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _named(name: str | None) -> Iterator[None]:
    """Re-raise core errors with ``layer '<name>': `` in front, keeping the exception type."""
    if name is None:
        yield
        return
    try:
        yield
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        # Only the plain types the core raises are rebuilt; subclasses with other constructors
        # (UnicodeError, ...) pass through untouched.
        if type(e) not in _RENAMEABLE:
            raise
        raise type(e)(f"layer {name!r}: {e}") from e


_RENAMEABLE = (ValueError, OSError, RuntimeError, TypeError, HessianNotPositiveDefiniteError)


def _cpu(t: torch.Tensor, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    return t.detach().cpu() if t.device.type != "cpu" else t.detach()


def _float32(t: torch.Tensor, arg: str) -> np.ndarray:
    """float32 C-contiguous numpy view (copies only when dtype/layout/device require it)."""
    t = _cpu(t, arg)
    if not (t.is_floating_point()):
        raise ValueError(f"{arg}: expected a floating-point tensor, got {t.dtype}")
    return t.to(torch.float32).contiguous().numpy()


def _integer(t: torch.Tensor, arg: str, dtype: torch.dtype) -> np.ndarray:
    """Integer tensor as a contiguous numpy array of ``dtype`` (range-checked when converted)."""
    t = _cpu(t, arg)
    if t.dtype != dtype:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{arg}: expected an integer tensor ({dtype}), got {t.dtype}")
        info = torch.iinfo(dtype)
        if t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            raise ValueError(
                f"{arg}: values must fit {dtype} ([{info.min}, {info.max}]), "
                f"got range [{int(t.min())}, {int(t.max())}]"
            )
        t = t.to(dtype)
    return t.contiguous().numpy()


def _back(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if device.type == "cpu" else t.to(device)


def _result(r: dict, device: torch.device) -> LayerQuantResult:
    perm = r["perm"]
    return LayerQuantResult(
        codes=_back(r["codes"], device),
        scales=_back(r["scales"], device),
        zeros=_back(r["zeros"], device),
        g_idx=_back(r["g_idx"], device),
        dequantized=_back(r["dequantized"], device),
        loss=float(r["loss"]),
        damp_frac=float(r["damp_frac"]),
        damp_attempts=[float(a) for a in r["damp_attempts"]],
        dead_columns=[int(d) for d in r["dead"]],
        perm=None if perm is None else _back(perm, device),
    )


# --------------------------------------------------------------------------------------------
# Hessian
# --------------------------------------------------------------------------------------------


class HessianAccumulator:
    """Streams activations ``[..., in_features]`` (fp32/fp16/bf16 CPU tensors) into ``H``."""

    def __init__(self, in_features: int) -> None:
        self._acc = _core.HessianAccumulator(in_features)

    @property
    def in_features(self) -> int:
        return int(self._acc.columns)

    def add_batch(self, x: torch.Tensor) -> None:
        """Adds every token of ``x`` (leading dimensions are flattened). float16 and bfloat16
        are read as they are (fp32 accumulation); other float dtypes are converted to float32."""
        x = _cpu(x, "x")
        n = self.in_features
        if x.dim() == 0 or x.shape[-1] != n:
            raise ValueError(f"x: expected shape [..., {n}], got {list(x.shape)}")
        x = x.reshape(-1, n).contiguous()
        if x.dtype == torch.bfloat16:
            self._acc.add_batch(x.view(torch.int16).numpy(), "bf16")
        elif x.dtype in (torch.float16, torch.float32):
            self._acc.add_batch(x.numpy())
        elif x.is_floating_point():
            self._acc.add_batch(x.to(torch.float32).numpy())
        else:
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")

    def merge(self, other: HessianAccumulator) -> None:
        """Adds ``other``'s samples, as if its batches had been added here."""
        self._acc.merge(other._acc)

    @property
    def samples(self) -> int:
        return int(self._acc.samples)

    def hessian(self) -> torch.Tensor:  # float32 [in, in]
        return torch.from_numpy(self._acc.hessian())


class CrossAccumulator:
    """Streams GPTAQ's ``(X - X~) X~^T`` from pairs of float-model and quantized-model inputs
    ``[..., in_features]`` of the same tokens, with :class:`HessianAccumulator`'s scaling."""

    def __init__(self, in_features: int) -> None:
        self._acc = _core.CrossAccumulator(in_features)

    def add_batch(self, float_rows: torch.Tensor, quant_rows: torch.Tensor) -> None:
        n = int(self._acc.columns)
        if float_rows.shape != quant_rows.shape or quant_rows.shape[-1] != n:
            raise ValueError(f"float_rows {list(float_rows.shape)} and quant_rows "
                             f"{list(quant_rows.shape)}: expected the same shape [..., {n}]")
        f = _cpu(float_rows, "float_rows").reshape(-1, n).to(torch.float32).contiguous()
        q = _cpu(quant_rows, "quant_rows").reshape(-1, n).to(torch.float32).contiguous()
        self._acc.add_batch(f.numpy(), q.numpy())

    @property
    def samples(self) -> int:
        return int(self._acc.samples)

    def dxxt(self) -> torch.Tensor:  # float32 [in, in]
        return torch.from_numpy(self._acc.dxxt())


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


_SCALE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _scale_dtype(scale_dtype: str | torch.dtype) -> str:
    """The core's name of a scale storage dtype given as a torch dtype or its name."""
    if isinstance(scale_dtype, torch.dtype):
        if scale_dtype not in _SCALE_DTYPES:
            choices = ", ".join(str(d) for d in _SCALE_DTYPES)
            raise ValueError(f"scale_dtype must be one of {choices}, got {scale_dtype}")
        return _SCALE_DTYPES[scale_dtype]
    if not isinstance(scale_dtype, str):
        raise TypeError(
            f"scale_dtype: expected a torch.dtype or a string, got {type(scale_dtype).__name__}"
        )
    return scale_dtype  # the core checks the name and lists the choices


def gptq_quantize(
    weight: torch.Tensor,  # [out, in], any float dtype
    hessian: torch.Tensor,  # float32 [in, in]
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = 128,  # -1 = per channel
    act_order: bool = False,
    static_groups: bool = False,
    group_aware: bool = False,  # with act_order and groups: GAR (whole groups in turn)
    block_size: int = 128,
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
    observer: str = "minmax",  # "mse", or "hessian_mse" (search weighted by diag(hessian))
    name: str | None = None,  # layer name, prefixed to error messages
    scale_dtype: str | torch.dtype = "float32",
    dxxt: torch.Tensor | None = None,  # float32 [in, in]: (X - X~) X~^T
    gptaq_alpha: float = 0.25,
    qronos: bool = False,
) -> LayerQuantResult:
    """GPTQ-quantizes one layer; results are on ``weight``'s device.

    With ``dxxt`` (:class:`CrossAccumulator`, scaled like ``hessian``) the solve is GPTAQ's,
    its extra term weighed by ``gptaq_alpha``, or with ``qronos=True`` Qronos' (GPTQ from the
    closed-form refit against the float output); ``loss`` is then against GPTAQ's moving
    target or Qronos' refit.

    ``scale_dtype`` is the dtype the checkpoint stores scales in (float16 for the GPTQ format,
    the model's dtype for compressed-tensors): every scale is rounded to it before codes are
    chosen and errors propagated with it, so the solve is what the checkpoint holds. The
    returned scales stay float32 tensors holding representable values."""
    with _named(name):
        w = _float32(weight, "weight")
        h = _float32(hessian, "hessian")
        r = _core.gptq_quantize(
            w,
            h,
            bits=bits,
            symmetric=symmetric,
            group_size=group_size,
            act_order=act_order,
            static_groups=static_groups,
            group_aware=group_aware,
            block_size=block_size,
            damp_percent=damp_percent,
            damp_growth=damp_growth,
            damp_max=damp_max,
            observer=observer,
            scale_dtype=_scale_dtype(scale_dtype),
            dxxt=None if dxxt is None else _float32(dxxt, "dxxt"),
            gptaq_alpha=float(gptaq_alpha),
            qronos=bool(qronos),
        )
        return _result(r, weight.device)


def rtn_quantize(
    weight: torch.Tensor,
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = 128,
    observer: str = "minmax",
    hessian: torch.Tensor | None = None,
    name: str | None = None,
    scale_dtype: str | torch.dtype = "float32",
) -> LayerQuantResult:
    """Round-to-nearest with the same grids (scales rounded to ``scale_dtype`` as in
    :func:`gptq_quantize`); ``loss`` is NaN unless ``hessian`` is given."""
    with _named(name):
        w = _float32(weight, "weight")
        h = None if hessian is None else _float32(hessian, "hessian")
        r = _core.rtn_quantize(
            w,
            bits=bits,
            symmetric=symmetric,
            group_size=group_size,
            observer=observer,
            hessian=h,
            scale_dtype=_scale_dtype(scale_dtype),
        )
        return _result(r, weight.device)


def fp8_quantize(
    weight: torch.Tensor,
    *,
    strategy: str = "channel",
    scale_dtype: str | torch.dtype = "float32",
    name: str | None = None,
) -> LayerQuantResult:
    """FP8 (E4M3) round-to-nearest of a ``[out, in]`` weight, per output channel or per tensor:
    ``scale = absmax / 448`` rounded to ``scale_dtype`` (a zero scale becomes float32 eps), codes
    ``float8_e4m3fn(clamp(w / scale, -448, 448))`` (``codes`` is that float8 tensor), dequantized
    ``codes * scale``. ``loss`` is the squared error."""
    with _named(name):
        w = torch.from_numpy(_float32(weight, "weight"))
        absmax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax()
        fmax = float(torch.finfo(torch.float8_e4m3fn).max)
        scale = (absmax / fmax).reshape(-1, 1)
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        dt = getattr(torch, _scale_dtype(scale_dtype))
        scale = scale.to(dt).to(torch.float32)
        codes = (w / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        deq = codes.to(torch.float32) * scale
        dev = weight.device
        return LayerQuantResult(
            codes=codes.to(dev), scales=scale.to(dev),
            zeros=torch.zeros(scale.shape, dtype=torch.int32, device=dev),
            g_idx=torch.zeros(w.shape[1], dtype=torch.int32, device=dev),
            dequantized=deq.to(dev), loss=float(((w - deq) ** 2).sum()), damp_frac=float("nan"),
            damp_attempts=[], dead_columns=[], perm=None)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def pack_gptq_qweight(
    codes: torch.Tensor, bits: int
) -> torch.Tensor:  # [out,in] u8 -> int32 [ceil(in*b/32), out]
    return _back(_core.pack_gptq_qweight(_integer(codes, "codes", torch.uint8), bits), codes.device)


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return _back(
        _core.unpack_gptq_qweight(_integer(qweight, "qweight", torch.int32), bits, in_features),
        qweight.device,
    )


def _v1(version: int) -> bool:
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (stores zero - 1) or 2 (raw zero), got {version}")
    return version == 1


def pack_gptq_qzeros(
    zeros: torch.Tensor, bits: int, version: int = 1
) -> torch.Tensor:  # [ng,out] -> [ng, ceil(out*b/32)]
    v1 = _v1(version)
    return _back(
        _core.pack_gptq_qzeros(_integer(zeros, "zeros", torch.int32), bits, v1), zeros.device
    )


def unpack_gptq_qzeros(
    qzeros: torch.Tensor, bits: int, out_features: int, version: int = 1
) -> torch.Tensor:
    v1 = _v1(version)
    return _back(
        _core.unpack_gptq_qzeros(_integer(qzeros, "qzeros", torch.int32), bits, out_features, v1),
        qzeros.device,
    )


def pack_ct_weight(
    codes: torch.Tensor, bits: int
) -> torch.Tensor:  # [out,in] -> [out, ceil(in*b/32)]
    return _back(_core.pack_ct_weight(_integer(codes, "codes", torch.uint8), bits), codes.device)


def unpack_ct_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return _back(
        _core.unpack_ct_weight(_integer(packed, "packed", torch.int32), bits, in_features),
        packed.device,
    )


def pack_ct_zero_point(
    zeros: torch.Tensor, bits: int
) -> torch.Tensor:  # [out,ng] -> [ceil(out*b/32), ng]
    return _back(
        _core.pack_ct_zero_point(_integer(zeros, "zeros", torch.uint8), bits), zeros.device
    )


def unpack_ct_zero_point(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return _back(
        _core.unpack_ct_zero_point(_integer(packed, "packed", torch.int32), bits, out_features),
        packed.device,
    )


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_ST_DTYPES: dict[torch.dtype, tuple[str, torch.dtype | None]] = {
    torch.float32: ("F32", None),
    torch.float16: ("F16", None),
    torch.bfloat16: ("BF16", torch.int16),  # no numpy bf16: pass the bit pattern
    torch.int32: ("I32", None),
    torch.int64: ("I64", None),
    torch.int8: ("I8", None),
    torch.uint8: ("U8", None),
    torch.float8_e4m3fn: ("F8_E4M3", torch.uint8),  # no numpy fp8: pass the bytes
}


def write_safetensors(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    stem: str = "model",
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Writes ``tensors`` atomically to ``{stem}.safetensors`` (or shards plus an index when the
    total exceeds ``max_shard_bytes``); returns the written paths.

    ``tensors`` is a mapping or an iterable of ``(name, tensor)`` pairs, consumed lazily: each
    shard is written as soon as it is complete and its tensors are then released, so a
    generator can produce them shard by shard. Contiguous CPU tensors are written from their
    own buffers (no copy); others are copied one at a time."""
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    Path(directory).mkdir(parents=True, exist_ok=True)
    paths = _core.write_safetensors(
        str(directory), _st_items(pairs), stem=stem, max_shard_bytes=max_shard_bytes, metadata=metadata
    )
    return [Path(p) for p in paths]


def _st_items(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, np.ndarray, str]]:
    for name, t in pairs:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _ST_DTYPES:
            supported = ", ".join(str(d) for d in _ST_DTYPES)
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not supported ({supported})")
        st, view = _ST_DTYPES[t.dtype]
        t = _cpu(t, f"tensor {name!r}").contiguous()
        if view is not None:
            t = t.view(view)
        yield name, t.numpy(), st


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


def available_threads() -> int:
    """Threads the core computes with (RAYON_NUM_THREADS or the cores, unless set below)."""
    return int(_core.available_threads())


def set_num_threads(n: int) -> None:
    """Uses a dedicated pool of ``n`` threads for every later core call."""
    _core.set_num_threads(n)
