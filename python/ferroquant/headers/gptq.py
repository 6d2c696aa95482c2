"""GPTQ settings from a checkpoint's config (with GPTQModel ``dynamic`` overrides) and each
quantized layer's tensors checked against them from the safetensors headers; no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .common import CHECKPOINT_FORMAT_ALIASES, n_groups_for
from .files import FLOAT_CODES, CheckpointError, HeaderFiles

GPTQ_BITS = (2, 3, 4, 8)


@dataclass
class GPTQSettings:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    version: int
    dynamic: dict[str, Any] = field(default_factory=dict)
    source: str = "config.json"
    static_groups: bool = False

    @classmethod
    def from_config(cls, qc: dict[str, Any], source: str) -> GPTQSettings:
        try:
            bits = int(qc["bits"])
            gs = int(qc.get("group_size", -1))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: GPTQ quantization_config needs integer 'bits' and 'group_size'") from None
        if bits not in GPTQ_BITS:
            raise CheckpointError(f"{source}: GPTQ bits={bits} not one of {GPTQ_BITS}")
        if gs == 0 or gs < -1:
            raise CheckpointError(f"{source}: GPTQ group_size={gs} (expected -1 or a positive size)")
        raw = str(qc.get("checkpoint_format") or qc.get("format") or "gptq")
        fmt = CHECKPOINT_FORMAT_ALIASES.get(raw.lower(), raw)
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(
                f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' v1 and "
                "'gptq_v2'; marlin/bitblas/exllama repacked layouts are not)"
            )
        dyn = qc.get("dynamic") or {}
        if not isinstance(dyn, dict):
            raise CheckpointError(f"{source}: 'dynamic' must be an object")
        meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
        static = bool(qc.get("static_groups", meta.get("static_groups", False)))
        return cls(bits, gs, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                   1 if fmt == "gptq" else 2, dyn, source, static)

    def for_module(self, name: str) -> tuple[int, int, bool] | None:
        """(bits, group_size, sym) for a module after GPTQModel ``dynamic`` overrides; None if a
        negative (``-:``) rule excludes it."""
        bits, gs, sym = self.bits, self.group_size, self.sym
        for pattern, override in self.dynamic.items():
            neg = pattern.startswith("-:")
            pat = pattern[2:] if pattern.startswith(("+:", "-:")) else pattern
            try:
                hit = re.match(pat, name) is not None
            except re.error as e:
                raise CheckpointError(f"{self.source}: bad 'dynamic' regex {pattern!r}: {e}") from None
            if not hit:
                continue
            if neg:
                return None
            if isinstance(override, dict):
                bits = int(override.get("bits", bits))
                gs = int(override.get("group_size", gs))
                sym = bool(override.get("sym", sym))
            break
        return bits, gs, sym


def quantized_prefixes(files: HeaderFiles) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in files.names() if n.endswith(".qweight"))


@dataclass
class LayerHeader:
    """One quantized layer's settings and shape, checked from the safetensors headers alone."""

    bits: int
    group_size: int
    sym: bool
    in_features: int
    out_features: int
    n_groups: int
    why: str


def check_layer_header(
    files: HeaderFiles, prefix: str, settings: GPTQSettings,
    in_features: int | None = None, out_features: int | None = None,
) -> LayerHeader:
    """Check presence, dtypes and shapes of one layer's tensors against the config (and the
    model's layer shape where known) without reading any tensor data."""
    per = settings.for_module(prefix)
    if per is None:
        raise CheckpointError(
            f"{files.dir}: '{prefix}.qweight' exists but {settings.source}'s 'dynamic' excludes '{prefix}'"
        )
    bits, gs, sym = per
    qw = files.expect(f"{prefix}.qweight", "I32", None)
    if len(qw.shape) != 2:
        raise CheckpointError(f"{qw.file}: tensor '{prefix}.qweight' must be 2-D, got {list(qw.shape)}")
    rows, out = qw.shape
    if out_features is not None and out != out_features:
        raise CheckpointError(
            f"{qw.file}: tensor '{prefix}.qweight' has {out} columns but the model's layer has "
            f"out_features={out_features}"
        )
    if in_features is None:
        if f"{prefix}.g_idx" in files:
            in_features = files.info(f"{prefix}.g_idx").shape[0]
        else:
            in_features = rows * 32 // bits
    if in_features * bits % 32 or rows != in_features * bits // 32:
        raise CheckpointError(
            f"{qw.file}: tensor '{prefix}.qweight' has shape {list(qw.shape)}, but {settings.source} "
            f"says bits={bits} and the layer has in_features={in_features}: expected "
            f"[{in_features * bits / 32:g}, {out}] (bits or shape disagree)"
        )
    ng = n_groups_for(in_features, gs)
    why = f"bits={bits}, group_size={gs} from {settings.source}, in_features={in_features}, out_features={out}"
    if out * bits % 32:
        raise CheckpointError(f"{qw.file}: '{prefix}': out_features={out} x {bits} bits does not fill whole words")
    files.expect(f"{prefix}.qzeros", "I32", (ng, out * bits // 32), why)
    files.expect(f"{prefix}.scales", FLOAT_CODES, (ng, out), why)
    if f"{prefix}.g_idx" in files:
        files.expect(f"{prefix}.g_idx", ("I32", "I64"), (in_features,), why)
    return LayerHeader(bits, gs, sym, in_features, out, ng, why)
