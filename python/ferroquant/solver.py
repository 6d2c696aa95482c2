"""Typed torch-facing wrapper over ferroquant._core. OWNER: bindings helper.

CONTRACT used by the pipeline and format helpers (signatures fixed; bodies to be written):
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


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


class HessianAccumulator:
    """Streams activations ``[..., in_features]`` (fp32/fp16/bf16 CPU tensors) into ``H``."""

    def __init__(self, in_features: int) -> None: ...
    def add_batch(self, x: torch.Tensor) -> None: ...
    @property
    def samples(self) -> int: ...
    def hessian(self) -> torch.Tensor: ...  # float32 [in, in]


def gptq_quantize(
    weight: torch.Tensor,  # [out, in], any float dtype
    hessian: torch.Tensor,  # float32 [in, in]
    *,
    bits: int = 4,
    symmetric: bool = True,
    group_size: int = 128,  # -1 = per channel
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    damp_percent: float = 0.01,
    damp_growth: float = 2.0,
    damp_max: float = 1.0,
    observer: str = "minmax",  # or "mse"
    name: str | None = None,  # layer name, prefixed to error messages
) -> LayerQuantResult: ...


def rtn_quantize(
    weight: torch.Tensor, *, bits: int = 4, symmetric: bool = True, group_size: int = 128,
    observer: str = "minmax", hessian: torch.Tensor | None = None, name: str | None = None,
) -> LayerQuantResult: ...


def pack_gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor: ...  # [out,in] u8 -> int32 [ceil(in*b/32), out]
def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor: ...
def pack_gptq_qzeros(zeros: torch.Tensor, bits: int, version: int = 1) -> torch.Tensor: ...  # [ng,out] -> [ng, ceil(out*b/32)]
def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, version: int = 1) -> torch.Tensor: ...
def pack_ct_weight(codes: torch.Tensor, bits: int) -> torch.Tensor: ...  # [out,in] -> [out, ceil(in*b/32)]
def unpack_ct_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor: ...
def pack_ct_zero_point(zeros: torch.Tensor, bits: int) -> torch.Tensor: ...  # [out,ng] -> [ceil(out*b/32), ng]
def unpack_ct_zero_point(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor: ...


def write_safetensors(
    directory: str | Path, tensors: dict[str, torch.Tensor], *, stem: str = "model",
    max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None,
) -> list[Path]: ...
