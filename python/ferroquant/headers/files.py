"""Validated safetensors headers of a checkpoint directory (single file or sharded), its JSON
files, and the error type every checkpoint reader raises; no torch."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint on disk is malformed or disagrees with its config (names file and tensor)."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level")
    return data


# safetensors dtype code -> (torch's name for it, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1), "U16": ("uint16", 2), "U32": ("uint32", 4),
    "U64": ("uint64", 8),
}
FLOAT_CODES = ("F16", "BF16", "F32")  # what scales may be stored in
_INT_FORMATS = {"I64": "q", "I32": "i", "I16": "h", "I8": "b", "U8": "B", "U16": "H",
                "U32": "I", "U64": "Q"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TensorInfo:
    name: str
    dtype: str  # the safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # where the data starts in the file

    @property
    def dtype_name(self) -> str:
        """torch's name for the dtype ("float32")."""
        return ST_DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.dtype][1]


_CODE_OF_NAME = {name: code for code, (name, _) in ST_DTYPES.items()}


def dtype_codes(dtype: Any) -> tuple[str, ...]:
    """Safetensors codes for one dtype or a tuple of them, each a code ("I32") or a torch dtype
    (matched by name, so torch-side callers pass theirs without this module importing torch)."""
    items = dtype if isinstance(dtype, tuple) else (dtype,)
    return tuple(d if d in ST_DTYPES else _CODE_OF_NAME[str(d).removeprefix("torch.")]
                 for d in items)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file's real size.

    Raises CheckpointError naming the file and the tensor for: a file too short for its
    header, a header that is not JSON, an unknown dtype, a byte range that does not match
    shape x dtype, ranges that overlap or leave holes, and data that runs past the end of the
    file (a truncated file)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file not found") from None
    if size < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes, shorter than the 8-byte header size)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated or corrupt"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: tensor '{name}': header entry is not an object")
        dt = ST_DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
        if dt is None:
            raise CheckpointError(f"{path}: tensor '{name}': unknown dtype {meta.get('dtype')!r}")
        shape = meta.get("shape")
        offs = meta.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
        ):
            raise CheckpointError(f"{path}: tensor '{name}': malformed shape/data_offsets in header")
        begin, end = offs
        nbytes = math.prod(shape) * dt[1]
        if begin < 0 or end < begin or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor '{name}': header says bytes [{begin}, {end}) but shape {shape} "
                f"{meta['dtype']} needs {nbytes} bytes"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor '{name}': data ends at byte {end} of the data section but the file "
                f"holds only {data_len} (truncated file?)"
            )
        spans.append((begin, end, name))
        out[name] = TensorInfo(name, meta["dtype"], tuple(shape), path, 8 + n + begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{name}': byte range [{begin}, {end}) {what}")
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{path}: data section is {data_len} bytes but the header accounts for {pos}"
        )
    return out


class HeaderFiles:
    """The safetensors files of a checkpoint directory (single file or sharded with an index),
    with every header validated up front; no tensor data is read except by :meth:`read_ints`."""

    def __init__(self, directory: str | os.PathLike, stem: str = "model") -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index = self.dir / f"{stem}.safetensors.index.json"
        single = self.dir / f"{stem}.safetensors"
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            idx = read_json(index)
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: missing or empty 'weight_map'")
            by_file: dict[str, list[str]] = {}
            for tname, fname in wm.items():
                if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
                    raise CheckpointError(f"{index}: tensor '{tname}': bad shard file name {fname!r}")
                by_file.setdefault(fname, []).append(tname)
            for fname, names in sorted(by_file.items()):
                shard = self.dir / fname
                if not shard.is_file():
                    raise CheckpointError(
                        f"{shard}: shard listed in {index.name} is missing (it should hold "
                        f"'{names[0]}' and {len(names) - 1} more tensors)"
                    )
                header = read_safetensors_header(shard)
                for tname in names:
                    if tname not in header:
                        raise CheckpointError(
                            f"{shard}: tensor '{tname}' is listed in {index.name} but not in the file"
                        )
                for tname, info in header.items():
                    if wm.get(tname) != fname:
                        raise CheckpointError(
                            f"{shard}: tensor '{tname}' is in the file but {index.name} maps it to "
                            f"{wm.get(tname)!r}"
                        )
                    self.tensors[tname] = info
        elif single.is_file():
            self.tensors = read_safetensors_header(single)
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            raise CheckpointError(
                f"{self.dir}: no {single.name} or {index.name}"
                + (f" (found {found})" if found else "")
            )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def expect(self, name: str, dtype: Any, shape: tuple[int, ...] | None,
               why: str = "") -> TensorInfo:
        """Check presence, dtype (see :func:`dtype_codes`; None: any) and shape of a tensor from
        the header."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor '{name}' is missing{(' (' + why + ')') if why else ''}")
        if dtype is not None:
            codes = dtype_codes(dtype)
            if info.dtype not in codes:
                raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype_name}, "
                                      f"expected {' or '.join(ST_DTYPES[c][0] for c in codes)}")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}"
                + (f" ({why})" if why else "")
            )
        return info

    def read_ints(self, name: str) -> list[int]:
        """A small integer tensor's values, flattened, read straight from its file (what a
        header check needs of the data: compressed-tensors' 2-integer ``weight_shape``)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        code = _INT_FORMATS.get(info.dtype)
        if code is None:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype_name}, "
                                  "expected an integer dtype")
        count = math.prod(info.shape)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.nbytes)
        return list(struct.unpack(f"<{count}{code}", raw))
