"""The CUDA path (``device="cuda"``): Hessians and GPTQ solves on torch CUDA tensors.

Same signatures and results as :mod:`ferroquant.solver`, for tensors on an NVIDIA GPU. Tensors
stay on the device: Rust receives the tensors themselves, reads them through
``__cuda_array_interface__`` and ``__dlpack_device__`` after checking device, dtype, shape and
strides, and gets ``torch.cuda.current_stream().cuda_stream``. It runs cuBLAS / cuSOLVER /
NVRTC kernels on a stream of its own in the device's primary context (the thread's current
context, hence torch's current device, is as before after every call), and joins that stream
to torch's with events both ways, so no host synchronisation is needed around it. This module
only allocates outputs and workspaces with torch, so torch's caching allocator stays the only
allocator.

Without CUDA (no driver, no CUDA 13 libraries, a build without the ``cuda`` feature) every
function raises ``RuntimeError("CUDA is not available: <why>")``; :func:`available` says whether
it would. Option errors are the CPU solver's ``ValueError``s, raised before that.

Not on the GPU yet: the MSE observer (``observer="mse"`` raises ``ValueError``; use
``device="cpu"``).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path

import torch

from ferroquant import _core
from ferroquant.solver import LayerQuantResult, _named, _scale_dtype

__all__ = [
    "HessianAccumulator",
    "available",
    "device_name",
    "gptq_quantize",
    "unavailable_reason",
]

# Libraries cudarc opens by soname (CUDA 13). torch's CUDA wheels ship them under
# site-packages/nvidia/*/lib without putting them on the loader path; loading them here with
# RTLD_GLOBAL first makes cudarc's dlopen("libcublas.so.13") find the same copies torch uses.
_SONAMES = ("libcublasLt.so.13", "libcublas.so.13", "libcusolver.so.12", "libnvrtc.so.13")
_preload_lock = threading.Lock()
_preloaded = False


def _nvidia_lib_dirs() -> list[Path]:
    dirs: list[Path] = []
    for entry in map(Path, __import__("sys").path):
        root = entry / "nvidia"
        if root.is_dir():
            dirs.extend(p for p in root.glob("*/lib") if p.is_dir())
    return dirs


def _preload() -> None:
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        _preloaded = True
        if os.environ.get("FERROQUANT_NO_PRELOAD"):
            return
        dirs = _nvidia_lib_dirs()
        for name in _SONAMES:
            for d in dirs:
                path = d / name
                if path.exists():
                    try:
                        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                    except OSError:
                        continue
                    break


def available() -> bool:
    """Whether the CUDA path can run here (driver, CUDA 13 libraries, a context on GPU 0)."""
    _preload()
    return bool(_core.cuda_available())


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _preload()
    return _core.cuda_unavailable_reason()


def _require() -> None:
    if not available():
        raise RuntimeError(f"CUDA is not available: {unavailable_reason()}")


def device_name(device: int | torch.device | None = None) -> str:
    _require()
    return str(_core.cuda_device_name(_ordinal(device)))


def _ordinal(device: int | torch.device | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {d}")
    return d.index if d.index is not None else torch.cuda.current_device()


def _tensor(t: object, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _float32(t: torch.Tensor) -> torch.Tensor:
    # Float tensors of other widths are converted where they are; anything else goes through
    # as it is, for the binding to refuse with the argument's name.
    t = t.detach()
    return t.to(torch.float32).contiguous() if t.is_floating_point() else t


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


class HessianAccumulator:
    """``H = (2/n) sum x x^T`` on the GPU (fp32 accumulation; fp16/bf16 inputs on tensor cores).

    Same interface as :class:`ferroquant.solver.HessianAccumulator`; :meth:`hessian` returns the
    device tensor itself (float32 ``[in, in]``, both triangles). A NaN/Inf in a batch is recorded
    on the device, not checked per batch (that would wait for the GPU every batch): it is raised
    by :meth:`hessian`, with the CPU accumulator's message for the first bad batch."""

    def __init__(self, in_features: int, device: int | torch.device | None = None) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        _require()
        self._device = torch.device("cuda", _ordinal(device))
        self._n = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=self._device)
        # the first non-finite batch's [batch, index, dtype] as u64s; all ones: none yet
        self._slot = torch.full((24,), 0xFF, dtype=torch.uint8, device=self._device)
        self._samples = 0
        self._batches = 0

    @property
    def in_features(self) -> int:
        return self._n

    @property
    def samples(self) -> int:
        return self._samples

    def add_batch(self, x: torch.Tensor) -> None:
        """Adds every token of ``x`` ``[..., in_features]`` (a CUDA tensor on this device)."""
        x = _tensor(x, "x").detach()
        if x.is_floating_point() and x.dtype not in (torch.float16, torch.bfloat16):
            x = x.to(torch.float32)
        dtype = None
        if x.dtype == torch.bfloat16:
            # __cuda_array_interface__ has no bfloat16 type: pass the bits and say what they are
            x, dtype = x.view(torch.int16), "bfloat16"
        rows = _core.cuda_hessian_add(
            self._h,
            x.contiguous(),
            self._slot,
            self._samples,
            self._batches,
            _stream(self._device),
            self._device.index,
            dtype=dtype,
        )
        if rows:
            self._samples += rows
            self._batches += 1

    def merge(self, other: HessianAccumulator) -> None:
        """Adds ``other``'s samples, as if its batches had been added here."""
        if other._n != self._n:
            raise ValueError(
                f"cannot merge Hessian accumulators of different sizes: {self._n} vs {other._n} "
                f"input features"
            )
        if other._samples == 0:
            return
        other._check()  # as the CPU would have: other's own batch named
        total = self._samples + other._samples
        wa, wb = self._samples / total, other._samples / total
        self._h.mul_(wa).add_(other._h.to(self._device), alpha=wb)
        self._samples = total
        self._batches += other._batches

    def hessian(self) -> torch.Tensor:
        self._check()
        return self._h

    def _check(self) -> None:
        """The one host read of the non-finite record (ValueError naming batch, row, column)."""
        _core.cuda_hessian_check(self._slot, self._n, _stream(self._device), self._device.index)


def gptq_quantize(
    weight: torch.Tensor,  # [out, in] CUDA, any float dtype
    hessian: torch.Tensor,  # float32 [in, in] CUDA, same device
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = 128,  # -1 = per channel
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,  # batches are at most 128 columns on the GPU
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
    observer: str = "minmax",  # "mse" is CPU-only for now
    name: str | None = None,
    scale_dtype: str | torch.dtype = "float32",  # see ferroquant.solver.gptq_quantize
) -> LayerQuantResult:
    """GPTQ-quantizes one layer on the GPU; results are CUDA tensors on ``weight``'s device and
    equal :func:`ferroquant.solver.gptq_quantize`'s (codes up to rounding ties)."""
    with _named(name):
        weight = _tensor(weight, "weight")
        hessian = _tensor(hessian, "hessian")
        sdt = _scale_dtype(scale_dtype)
        _core.cuda_check_options(
            bits=bits,
            symmetric=symmetric,
            group_size=group_size,
            block_size=block_size,
            damp_percent=damp_percent,
            damp_growth=damp_growth,
            damp_max=damp_max,
            observer=observer,
            scale_dtype=sdt,
        )
        _require()
        w, h = _float32(weight), _float32(hessian)
        ordinal = w.device.index if w.is_cuda else torch.cuda.current_device()
        # Device, dtype, shape and strides of both inputs, checked by the binding.
        rows, cols = _core.cuda_gptq_inputs(w, h, ordinal)
        dev = torch.device("cuda", ordinal)
        ng = 1 if group_size == -1 else math.ceil(cols / group_size)
        codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
        scales = torch.empty(rows, ng, dtype=torch.float32, device=dev)
        zeros = torch.empty(rows, ng, dtype=torch.int32, device=dev)
        dq = torch.empty(rows, cols, dtype=torch.float32, device=dev)
        ws_bytes = int(_core.cuda_gptq_workspace_bytes(rows, cols, ordinal))
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
        r = _core.cuda_gptq_solve(
            w,
            h,
            codes,
            scales,
            zeros,
            dq,
            ws,
            _stream(dev),
            ordinal,
            bits=bits,
            symmetric=symmetric,
            group_size=group_size,
            act_order=act_order,
            static_groups=static_groups,
            block_size=block_size,
            damp_percent=damp_percent,
            damp_growth=damp_growth,
            damp_max=damp_max,
            observer=observer,
            scale_dtype=sdt,
        )
        perm = r["perm"]
        return LayerQuantResult(
            codes=codes,
            scales=scales,
            zeros=zeros,
            g_idx=torch.tensor(r["g_idx"], dtype=torch.int32, device=dev),
            dequantized=dq,
            loss=float(r["loss"]),
            damp_frac=float(r["damp_frac"]),
            damp_attempts=[float(a) for a in r["damp_attempts"]],
            dead_columns=[int(d) for d in r["dead"]],
            perm=None if perm is None else torch.tensor(perm, dtype=torch.int64, device=dev),
        )
