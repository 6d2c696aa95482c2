"""Shared pieces of the checkpoint writers and readers: atomic directory writing, safetensors
reading on top of the torch-free header checks, tokenizer/recipe files and small helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

# the torch-free header rules, re-exported here where the writers and readers import them from
from ..headers.common import n_groups_for  # noqa: F401
from ..headers.files import (  # noqa: F401
    CheckpointError,
    HeaderFiles,
    TensorInfo,
    read_json,
    read_safetensors_header,
)
from ..quantized import QuantizedWeight

# ---------------------------------------------------------------------------------------------
# In-memory quantized layer, format independent.


@dataclass
class LayerCodes(QuantizedWeight):
    """One quantized Linear as the writers and readers handle it: the pipeline's
    :class:`QuantizedWeight` (codes in ``nn.Linear`` orientation) plus its ``bias`` (or None)."""

    bias: torch.Tensor | None = None
    # the layer's input / output activation quantizers
    # (:class:`ferroquant.activations.ActivationQuantizer`), or None
    input_act: Any = None
    output_act: Any = None

    @property
    def bits(self) -> int:
        return int(self.args.num_bits)

    @property
    def is_float(self) -> bool:
        """FP8 weights: ``codes`` are E4M3 values, scales per tensor or channel, no zero point."""
        return self.args.type == "float"

    @property
    def group_size(self) -> int:
        return self.args.effective_group_size

    def trivial_g_idx(self) -> torch.Tensor:
        return default_g_idx(self.in_features, self.group_size)

    def has_trivial_g_idx(self) -> bool:
        return bool(torch.equal(self.g_idx.to(torch.int32), self.trivial_g_idx()))

    def is_symmetric_codes(self) -> bool:
        """Zero is the midpoint 2**(bits-1) everywhere (what symmetric GPTQ and compressed-tensors
        symmetric storage both imply); FP8 codes have no zero point."""
        return self.is_float or bool((self.zeros == (1 << (self.bits - 1))).all())


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Contiguous groups: column ``i`` belongs to group ``i // group_size`` (0 for per-channel)."""
    if group_size <= 0:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


# ---------------------------------------------------------------------------------------------
# Sizes, json, files.

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(size: int | str | None) -> int | None:
    """``"2GB"`` -> 2_000_000_000 (decimal units as transformers uses; ``GiB`` binary)."""
    if size is None or isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected an int or a size like '2GB' or '500MiB'")
    unit = m.group(2).upper() if m.group(2) else None
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


# Files a tokenizer or generation setup consists of (copied beside the weights).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json",
)


def copy_aux_files(src_dir: Path, dst_dir: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    copied = []
    for name in names:
        p = src_dir / name
        if p.is_file():
            shutil.copy2(p, dst_dir / name)
            copied.append(name)
    return copied


def recipe_to_yaml(recipe: Any) -> str:
    """Serialise a recipe object (pydantic, dataclass, dict, or anything with ``to_yaml``)."""
    import yaml

    if hasattr(recipe, "to_yaml"):
        text = recipe.to_yaml()
        if isinstance(text, str):
            return text
    if hasattr(recipe, "to_dict") and callable(recipe.to_dict):
        data = recipe.to_dict()  # ferroquant.GPTQ: round-trips through GPTQ.from_dict
    elif hasattr(recipe, "model_dump"):
        data = recipe.model_dump(mode="json")
    elif is_dataclass(recipe) and not isinstance(recipe, type):
        data = asdict(recipe)
    elif isinstance(recipe, dict):
        data = recipe
    else:
        data = {k: v for k, v in vars(recipe).items() if not k.startswith("_")}
    return yaml.safe_dump(_jsonable(data), sort_keys=False)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "model_dump"):
        return _jsonable(x.model_dump(mode="json"))
    return str(x)


def recipe_get(recipe: Any, name: str, default: Any = None) -> Any:
    if recipe is None:
        return default
    if isinstance(recipe, dict):
        return recipe.get(name, default)
    return getattr(recipe, name, default)


# ---------------------------------------------------------------------------------------------
# Atomic directory writing.


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite`` and it is an empty directory or one
    that holds a checkpoint (``config.json`` and ``*.safetensors``): replacing it deletes what
    it holds, which must not be someone else's files."""
    out = Path(out_dir).absolute()
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; not replacing it")
    names = [p.name for p in out.iterdir()]
    if names and not ((out / "config.json").is_file() and any(out.glob("*.safetensors"))):
        shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FileExistsError(
            f"{out} is not a checkpoint directory (no config.json with *.safetensors; it holds "
            f"{shown}); overwriting would delete those files, so it is left alone: remove it "
            "yourself or choose another output directory"
        )


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success rename it to ``out_dir``.

    A half-written directory never appears under the final name: on any exception the
    temporary directory is removed and ``out_dir`` (if it existed) is untouched. With
    ``overwrite=True`` an existing ``out_dir`` (empty, or a checkpoint: see
    :func:`check_replaceable`) is first renamed aside, the new one renamed in, then the old one
    deleted; if the swap fails the old one is put back. The directory and its files get the
    permissions of any file the user creates (the umask applies), not the temporary
    directory's private 0700.
    """
    out = Path(out_dir).absolute()
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        mask = _umask()
        tmp.chmod(0o777 & ~mask)
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~mask)
        _fsync_dir(tmp)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while writing; pass overwrite=True to replace it")
            check_replaceable(out, overwrite)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# Validated safetensors reading.


class CheckpointFiles(HeaderFiles):
    """:class:`~ferroquant.headers.files.HeaderFiles` that also reads tensors (lazily,
    memory-mapped)."""

    def __init__(self, directory: str | os.PathLike, stem: str = "model") -> None:
        super().__init__(directory, stem)
        self._handles: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor '{name}' not found in the checkpoint")
        h = self._handles.get(info.file)
        if h is None:
            try:
                h = safe_open(str(info.file), framework="pt", device="cpu")
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{info.file}: cannot open ({e})") from None
            self._handles[info.file] = h
        try:
            return h.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{info.file}: tensor '{name}': cannot read ({e})") from None
