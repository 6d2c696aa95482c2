"""Checkpoint writers and readers: GPTQ (v1, v2) and compressed-tensors (``pack-quantized``,
``int-quantized``, ``float-quantized``, with activation and KV-cache scales).

- ``save(model, dir, format=...)`` writes every module carrying ``fq_quant`` in the chosen
  layout (with its activation quantizers' scales, and the attention modules' KV-cache scales),
  all other tensors as they are, ``config.json`` with ``quantization_config`` (plus
  ``quantize_config.json`` for GPTQ), tokenizer/generation files and ``recipe.yaml``;
  atomically (a temporary sibling directory renamed into place).
- ``load(dir)`` rebuilds the model from its config on the meta device, swaps quantized layers
  for :class:`~ferroquant.nn.QuantLinear` / :class:`~ferroquant.nn.Float8Linear`, attaches
  the activation and KV-cache quantizers and loads the tensors (sharded or not).
- ``convert(src, dst, format=...)`` re-lays the codes without re-quantizing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .. import activations, solver
from ..config import match_target
from ..nn import Float8Linear, QuantizedLinear, QuantLinear
from ..quantized import ATTR, QuantizedWeight
from . import compressed_tensors as ct
from . import ct_activations, gptq
from .common import (
    CheckpointError,
    CheckpointFiles,
    LayerCodes,
    atomic_directory,
    check_replaceable,
    copy_aux_files,
    n_groups_for,
    parse_size,
    read_json,
    recipe_get,
    recipe_to_yaml,
    write_json,
)
from .feasibility import (
    TargetLayer,
    canonical_checkpoint_format,
    canonical_format,
    check_feasible,
    check_gptq_holds,
    format_of,
    layer_extras,
    model_dtype,
    scale_dtype_for,
)

__all__ = ["CheckpointError", "Float8Linear", "QuantLinear", "convert", "detect_format", "load", "save"]

Format = Literal["gptq", "compressed-tensors"]
_norm_format = canonical_format


# ---------------------------------------------------------------------------------------------
# save


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _linear_shape(name: str, m: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear-like module, None if it is not one."""
    if isinstance(m, QuantizedLinear):
        return m.out_features, m.in_features
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    if _is_conv1d(m):
        w = m.weight
        return int(w.shape[1]), int(w.shape[0])
    return None


def _layer_from_module(name: str, m: nn.Module, q: QuantizedWeight) -> LayerCodes:
    shape = _linear_shape(name, m)
    if shape is None:
        raise ValueError(f"{name}: has {ATTR} but is a {type(m).__name__}, not a Linear layer")
    out_f, in_f = shape
    bias = getattr(m, "bias", None)
    bias = bias.detach().cpu() if isinstance(bias, torch.Tensor) else None
    acts = {k: m.__dict__.get(a) for k, a in (("input_act", activations.INPUT),
                                              ("output_act", activations.OUTPUT))}
    if q.args.type == "float":
        return LayerCodes(*_float_codes(name, q, out_f, in_f), bias, **acts)
    b = int(q.args.num_bits)
    if not 1 <= b <= 8:
        raise ValueError(f"{name}: num_bits={b} out of range 1..8")
    if tuple(q.codes.shape) != (out_f, in_f):
        raise ValueError(f"{name}: codes shape {list(q.codes.shape)} != layer [out, in] = {[out_f, in_f]}")
    gs = q.args.effective_group_size
    ng = n_groups_for(in_f, gs)
    if tuple(q.scales.shape) != (out_f, ng) or tuple(q.zeros.shape) != (out_f, ng):
        raise ValueError(
            f"{name}: scales {list(q.scales.shape)} / zeros {list(q.zeros.shape)} do not match "
            f"[{out_f}, {ng}] for group_size={gs}"
        )
    if tuple(q.g_idx.shape) != (in_f,):
        raise ValueError(f"{name}: g_idx shape {list(q.g_idx.shape)} != [{in_f}]")
    codes = q.codes.detach().cpu()
    zeros = q.zeros.detach().cpu().to(torch.int32)
    g_idx = q.g_idx.detach().cpu().to(torch.int32)
    hi = (1 << b) - 1
    if codes.numel() and int(codes.max()) > hi:
        raise ValueError(f"{name}: codes exceed {hi} for {b} bits")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > hi):
        raise ValueError(f"{name}: zero points outside [0, {hi}] for {b} bits")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= ng):
        raise ValueError(f"{name}: g_idx values outside [0, {ng})")
    scales = q.scales.detach().cpu().to(torch.float32)
    if not torch.isfinite(scales).all():
        raise ValueError(f"{name}: non-finite scales")
    return LayerCodes(codes.to(torch.uint8), scales, zeros, g_idx, q.args, bias, **acts)


def _float_codes(name: str, q: QuantizedWeight, out_f: int, in_f: int) -> tuple[Any, ...]:
    """(codes, scales, zeros, g_idx, args) of FP8 weights, checked: E4M3 codes ``[out, in]``,
    float32 scales ``[out, 1]`` per channel or ``[1, 1]`` per tensor."""
    if q.codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{name}: FP8 weights need float8_e4m3fn codes, got {q.codes.dtype}")
    if tuple(q.codes.shape) != (out_f, in_f):
        raise ValueError(f"{name}: codes shape {list(q.codes.shape)} != layer [out, in] = {[out_f, in_f]}")
    rows = 1 if q.args.strategy == "tensor" else out_f
    scales = q.scales.detach().cpu().to(torch.float32).reshape(-1, 1)
    if scales.shape[0] != rows:
        raise ValueError(f"{name}: {q.args.strategy} FP8 weights need {rows} scale(s), got "
                         f"{list(q.scales.shape)}")
    if not torch.isfinite(scales).all():
        raise ValueError(f"{name}: non-finite scales")
    return (q.codes.detach().cpu(), scales, torch.zeros(scales.shape, dtype=torch.int32),
            torch.zeros(in_f, dtype=torch.int32), q.args)


def _dedupe_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors sharing storage (tied embeddings): saved once, re-tied on load."""
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for k, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t
    return out


def _resolve_target(model: nn.Module, format: str | None,
                    checkpoint_format: str | None) -> tuple[str, str, torch.dtype | None]:
    """(format, GPTQ checkpoint_format, scale dtype or None) for ``save``: the arguments where
    given, else what the model was quantized for (``model.fq_target``), else GPTQ v1."""
    target = getattr(model, "fq_target", None)
    target = target if isinstance(target, dict) else {}
    fmt = canonical_format(format if format is not None else target.get("format") or "gptq")
    same = target.get("format") is not None and canonical_format(target["format"]) == fmt
    cf = checkpoint_format if checkpoint_format is not None else (
        target.get("checkpoint_format") if same else None)
    cf = canonical_checkpoint_format(cf or "gptq") if fmt == "gptq" else "gptq"
    sdt = target.get("scale_dtype") if same else None
    return fmt, cf, sdt if isinstance(sdt, torch.dtype) else None


def save(
    model: nn.Module,
    out_dir: str | os.PathLike,
    format: Format | str | None = None,
    checkpoint_format: str | None = None,
    max_shard_size: int | str | None = "2GB",
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    gptq_dynamic: bool = False,
) -> Path:
    """Write a quantized model as a GPTQ or compressed-tensors checkpoint directory.

    ``format`` and ``checkpoint_format`` default to what the model was quantized for (when
    :func:`ferroquant.quantize` was told), else GPTQ v1. ``checkpoint_format`` (GPTQ only):
    ``"gptq"``/``"v1"`` (zero-1, read by every engine) or ``"gptq_v2"``/``"v2"`` (raw zeros;
    needed when an asymmetric zero point is 0). ``overwrite=True`` replaces ``out_dir`` only if
    it is empty or holds a checkpoint (config.json and safetensors files). Returns the path.
    """
    fmt, checkpoint_format, target_scale_dtype = _resolve_target(model, format, checkpoint_format)
    version = gptq.version_of(checkpoint_format) if fmt == "gptq" else 0
    max_bytes = parse_size(max_shard_size)
    out = Path(out_dir).absolute()
    check_replaceable(out, overwrite)

    layers: dict[str, LayerCodes] = {}
    linear_names: list[str] = []
    for name, m in model.named_modules():
        q = getattr(m, ATTR, None)
        if _linear_shape(name, m) is not None:
            linear_names.append(name)
        if q is None:
            continue
        if fmt == "compressed-tensors" and _is_conv1d(m):
            raise ValueError(
                f"{name}: compressed-tensors only quantizes nn.Linear; this is a transformers "
                "Conv1D (GPT-2 style). Use format='gptq' (which stores it in Linear orientation)"
            )
        layers[name] = _layer_from_module(name, m, q)
    if not layers:
        raise ValueError(f"no module carries {ATTR!r}: quantize the model before saving it")

    mdtype = model_dtype(model)
    scale_dtype = target_scale_dtype or scale_dtype_for(fmt, checkpoint_format, mdtype)
    recipe = getattr(model, "fq_recipe", None)
    kvs = ct_activations.model_kv(model)
    kv_cache = ct_activations.kv_scheme(kvs)
    if fmt == "gptq":  # refuse what the layout cannot store before anything is written
        check_gptq_holds(layer_extras(layers, kv_cache), hint="api", what="the model")
    if kv_cache is None and recipe_get(recipe, "kv_cache_scheme") is not None:
        raise CheckpointError("the recipe has a kv_cache_scheme but no attention module carries "
                              "KV-cache scales (fq_kv): the model was not quantized with it")
    if fmt == "gptq":
        for name, layer in layers.items():
            gptq.check_layer(name, layer, version)
    else:
        for name, layer in layers.items():
            ct.check_layer(name, layer)
    prefixes = tuple(n + "." for n in layers)
    sd = _dedupe_shared({k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)})
    for k, v in sd.items():
        if v.device.type == "meta":
            raise ValueError(f"{k}: tensor is on the meta device (not materialised); cannot save it")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        # Consumed by the writer shard by shard: each layer is packed only when its shard is
        # gathered and released once that shard is on disk; the model's own tensors are
        # written from their buffers.
        for name, layer in layers.items():
            if fmt == "gptq":
                yield from gptq.layer_tensors(name, layer, version).items()
            else:
                yield from ct.layer_tensors(name, layer, scale_dtype).items()
        for name, kv in kvs.items():
            yield from ct_activations.kv_tensors(name, kv, scale_dtype).items()
        yield from sd.items()

    cfg_obj = getattr(model, "config", None)
    config: dict[str, Any] = cfg_obj.to_dict() if cfg_obj is not None else {}
    if cfg_obj is not None and not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    if cfg_obj is not None and not config.get("dtype"):
        config["dtype"] = str(mdtype).removeprefix("torch.")  # as save_pretrained records it
    if fmt == "gptq":
        qconf = gptq.build_config(layers, recipe=recipe, checkpoint_format=checkpoint_format, dynamic=gptq_dynamic)
        gptq.exclude_unquantized(qconf, list(layers), [n for n in linear_names if n not in layers])
    else:
        ignore = [n for n in linear_names if n not in layers]
        qconf = ct.build_config(layers, ignore=ignore, kv_cache=kv_cache)
    config["quantization_config"] = qconf
    if any(n.split(".")[-1] == "lm_head" for n in layers):
        config["tie_word_embeddings"] = False

    with atomic_directory(out, overwrite=overwrite) as tmp:
        solver.write_safetensors(tmp, tensors(), stem="model", max_shard_bytes=max_bytes, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if fmt == "gptq":
            write_json(tmp / "quantize_config.json", qconf)
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
        src = _source_dir(model)
        if src is not None:  # (also when overwriting src itself: it is only replaced at the end)
            copy_aux_files(src, tmp)
        if isinstance(tokenizer, (str, os.PathLike)):
            copy_aux_files(Path(tokenizer), tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if not (tmp / "generation_config.json").exists() and gen is not None:
            with contextlib.suppress(Exception):  # a model without a usable generation config
                gen.save_pretrained(str(tmp))
    return out


def _source_dir(model: nn.Module) -> Path | None:
    for cand in (getattr(model, "name_or_path", None),
                 getattr(getattr(model, "config", None), "_name_or_path", None)):
        if cand and Path(str(cand)).is_dir():
            return Path(str(cand)).absolute()
    return None


# ---------------------------------------------------------------------------------------------
# load


def detect_format(directory: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """(format, quantization_config, where it came from) for a checkpoint directory."""
    d = Path(directory)
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path)
    qc = cfg.get("quantization_config")
    source = str(cfg_path)
    if qc is None and (d / "quantize_config.json").is_file():
        source = str(d / "quantize_config.json")
        qc = read_json(d / "quantize_config.json")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: no quantization_config (and no quantize_config.json): not a quantized checkpoint")
    fmt = format_of(qc)
    if fmt is None:
        method = qc.get("quant_method") or qc.get("method")
        raise CheckpointError(f"{source}: quant_method {method!r} is not supported (gptq or compressed-tensors)")
    return fmt, qc, source


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers stay real: the
    non-persistent ones (e.g. rotary inv_freq) are computed at construction and never saved."""
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            kw = {"requires_grad": param.requires_grad}
            self._parameters[name] = type(param)(param.to("meta"), **kw)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _build_empty_model(directory: Path, dtype: torch.dtype | None, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with _params_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def _param_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each named parameter/buffer; tied ones share a list."""
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[str, int] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pn, p in list(mod._parameters.items()) + list(mod._buffers.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pn}" if mod_name else pn
            by_id.setdefault(id(p), []).append((mod, pn))
            names[full] = id(p)
    return {n: by_id[i] for n, i in names.items()}


def _set_slot(mod: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def load(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    trust_remote_code: bool = False,
    cache_dequantized: bool = False,
) -> nn.Module:
    """Load a GPTQ (v1/v2) or compressed-tensors checkpoint as a transformers model whose
    quantized layers are :class:`QuantLinear` (integer codes) or :class:`Float8Linear` (FP8),
    with the checkpoint's activation and KV-cache quantization attached (so its forward is the
    fake-quantized model's). Nothing in ``directory`` is written.

    The layers keep their codes packed (a 4-bit model holds about a quarter of the fp16
    weights' memory) and dequantize on every forward. ``cache_dequantized=True`` keeps each
    layer's dequantized weight after its first forward instead: ``nn.Linear`` speed, at the
    float weights' memory on top of the codes."""
    d = Path(directory)
    fmt, qc, source = detect_format(d)
    files = CheckpointFiles(d)
    if fmt == "gptq":
        settings: Any = gptq.GPTQSettings.from_config(qc, source)
        prefixes = gptq.quantized_prefixes(files)
        reader: Any = gptq.read_layer

        def layer_names(prefix: str) -> list[str]:
            return [f"{prefix}.{s}" for s in gptq.TENSOR_SUFFIXES]
    else:
        settings = ct.CTSettings(qc, source)
        prefixes = ct.quantized_prefixes(files)
        reader = functools.partial(ct.read_layer, device=device)

        def layer_names(prefix: str) -> list[str]:
            return ct.layer_tensor_names(files, prefix, settings)
    if not prefixes:
        raise CheckpointError(f"{d}: config says {fmt} but no quantized tensors were found")

    model = _build_empty_model(d, dtype, trust_remote_code)
    cdtype = model_dtype(model)
    consumed: set[str] = set()
    for prefix in prefixes:
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            info = files.info(f"{prefix}.qweight" if fmt == "gptq" else f"{prefix}.weight_scale")
            raise CheckpointError(
                f"{info.file}: tensor '{info.name}' belongs to module '{prefix}', which the model "
                f"built from config.json does not have"
            ) from None
        shape = _linear_shape(prefix, mod)
        if shape is None:
            raise CheckpointError(f"{d}: quantized tensors for '{prefix}', but it is a {type(mod).__name__}")
        layer = reader(files, prefix, settings, in_features=shape[1], out_features=shape[0])
        kind = Float8Linear if layer.is_float else QuantLinear
        ql = kind.from_quantized(layer, layer.bias.to(cdtype) if layer.bias is not None else None,
                                 dtype=cdtype, cache_dequantized=cache_dequantized)
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ql)
        activations.attach(ql, input=layer.input_act, output=layer.output_act)
        consumed.update(layer_names(prefix))
    if fmt != "gptq" and settings.kv_cache is not None:
        kvs, names = ct_activations.read_kv(files, model, settings.kv_cache, source, device)
        for name, kv in kvs.items():
            activations.attach(model.get_submodule(name), kv=kv)
        consumed.update(names)

    slots = _param_slots(model)
    for name in files.names():
        if name in consumed:
            continue
        target = slots.get(name)
        if target is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # stale buffer some old checkpoints carry
            info = files.info(name)
            raise CheckpointError(
                f"{info.file}: tensor '{name}' does not belong to the model built from config.json"
            )
        mod, attr = target[0]
        current = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
        info = files.info(name)
        if current is not None and tuple(current.shape) != tuple(info.shape):
            raise CheckpointError(
                f"{info.file}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                f"{list(current.shape)}"
            )
        t = files.get(name)
        if t.is_floating_point():
            t = t.to(cdtype)
        new: torch.Tensor = nn.Parameter(t, requires_grad=False) if attr in mod._parameters else t
        for m, a in target:
            if a in m._parameters:
                m._parameters[a] = new  # type: ignore[assignment]
            else:
                m._buffers[a] = new
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out_emb, QuantizedLinear) and hasattr(model, "tie_weights"):
        model.tie_weights()  # tied heads were saved once (our writer and transformers' alike)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{d}: tensor(s) missing from the checkpoint: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    model.eval()
    model.to(device)
    _attach_generation_config(model, d)
    model.fq_checkpoint = {"format": fmt, "quantization_config": qc, "directory": str(d)}
    return model


def _attach_generation_config(model: nn.Module, d: Path) -> None:
    if (d / "generation_config.json").is_file():
        with contextlib.suppress(Exception):
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(d))


# ---------------------------------------------------------------------------------------------
# convert


def _linear_modules_from_config(directory: Path) -> list[str] | None:
    """Names of Linear-like modules of the architecture (built on meta), or None if unknown."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(directory))
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any failure just means "architecture unknown here"
        return None
    return [n for n, m in model.named_modules() if _linear_shape(n, m) is not None]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: Format | str = "compressed-tensors",
    checkpoint_format: str = "gptq",
    max_shard_size: int | str | None = "2GB",
    *,
    overwrite: bool = False,
    gptq_dynamic: bool = False,
    ignore: list[str] | tuple[str, ...] = (),
    hint: Literal["api", "cli"] = "api",
) -> Path:
    """Re-lay a quantized checkpoint between GPTQ v1, GPTQ v2 and compressed-tensors
    pack-quantized: unpack to integer codes and repack, no re-quantization. Scales change
    dtype (GPTQ stores fp16, compressed-tensors the model dtype); a conversion that would
    change a scale value warns. Layers matched by ``ignore`` (full names, ``re:`` regexes) are
    written as float weights (dequantized). Layers the target layout cannot hold are all
    reported at once, the ways out spelled as keyword arguments (``hint="api"``) or flags."""
    s = Path(src)
    out_fmt = _norm_format(format)
    if out_fmt == "gptq":
        checkpoint_format = canonical_checkpoint_format(checkpoint_format)
    version = gptq.version_of(checkpoint_format) if out_fmt == "gptq" else 0
    max_bytes = parse_size(max_shard_size)
    if Path(dst).absolute() == s.absolute():
        raise ValueError("convert: dst must differ from src (the source is never modified)")
    check_replaceable(dst, overwrite)
    in_fmt, qc, source = detect_format(s)
    files = CheckpointFiles(s)
    config = read_json(s / "config.json")
    kv_cache = None
    if in_fmt == "gptq":
        settings: Any = gptq.GPTQSettings.from_config(qc, source)
        prefixes = gptq.quantized_prefixes(files)
        layers = {p: gptq.read_layer(files, p, settings) for p in prefixes}
        consumed = {f"{p}.{x}" for p in prefixes for x in gptq.TENSOR_SUFFIXES}
    else:
        settings = ct.CTSettings(qc, source)
        prefixes = ct.quantized_prefixes(files)
        layers = {p: ct.read_layer(files, p, settings) for p in prefixes}
        consumed = {n for p in prefixes for n in ct.layer_tensor_names(files, p, settings)}
        kv_cache = settings.kv_cache  # its k_scale/v_scale are copied as they are
    if not layers:
        raise CheckpointError(f"{s}: no quantized tensors found")
    if out_fmt == "gptq":
        check_gptq_holds(layer_extras(layers, kv_cache), hint=hint, what=str(s))

    dt = config.get("dtype") or config.get("torch_dtype") or "float16"
    mdtype = getattr(torch, dt) if isinstance(dt, str) and isinstance(getattr(torch, dt, None), torch.dtype) else torch.float16
    tensors: dict[str, torch.Tensor] = {}
    unmatched = [t for t in ignore if not any(match_target(n, "Linear", t) for n in layers)]
    if unmatched:
        raise ValueError(f"ignore {unmatched}: no quantized layer of {s} matches "
                         f"(quantized layers look like {min(layers)!r})")
    for name in [n for n in layers if any(match_target(n, "Linear", t) for t in ignore)]:
        layer = layers.pop(name)
        tensors[f"{name}.weight"] = layer.dequantize(mdtype).contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(mdtype).contiguous()
    if not layers:
        raise ValueError(f"ignore {list(ignore)} leaves no layer of {s} quantized; nothing to convert")
    # every layer checked against the layout up front (v1's zero-point check needs the data:
    # check_layer does it below)
    check_feasible([TargetLayer(n, la.out_features, la.in_features, la.args, False)
                    for n, la in layers.items()], out_fmt, "gptq_v2", hint=hint,
                   suggest_other_format=in_fmt == out_fmt)
    for name, layer in layers.items():
        if out_fmt == "gptq":
            if layer.bias is not None:
                layer.bias = layer.bias.to(torch.float16)
            _warn_lossy(name, layer.scales, torch.float16)
            tensors.update(gptq.layer_tensors(name, layer, version))
        else:
            if layer.args.symmetric and not layer.is_symmetric_codes():
                layer.args = layer.args.model_copy(update={"symmetric": False})
            _warn_lossy(name, layer.scales, mdtype)
            tensors.update(ct.layer_tensors(name, layer, mdtype))
    for name in files.names():
        if name not in consumed:
            tensors[name] = files.get(name)

    if out_fmt == "gptq":
        qconf = gptq.build_config(layers, recipe=_read_recipe(s), checkpoint_format=checkpoint_format,
                                  dynamic=gptq_dynamic)
        linears = _linear_modules_from_config(s) or []
        gptq.exclude_unquantized(qconf, list(layers), [n for n in linears if n not in layers])
    else:
        linears = _linear_modules_from_config(s)
        if linears is None:
            # unknown architecture: exact-name targets cannot claim anything unintended
            ignore: list[str] = []
            qconf = ct.build_config(layers, ignore=ignore, kv_cache=kv_cache)
            for g in qconf["config_groups"].values():
                if g["targets"] == ["Linear"]:
                    g["targets"] = sorted(layers)
        else:
            qconf = ct.build_config(layers, ignore=[n for n in linears if n not in layers],
                                    kv_cache=kv_cache)
    config["quantization_config"] = qconf

    with atomic_directory(dst, overwrite=overwrite) as tmp:
        solver.write_safetensors(tmp, tensors, stem="model", max_shard_bytes=max_bytes, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if out_fmt == "gptq":
            write_json(tmp / "quantize_config.json", qconf)
        copy_aux_files(s, tmp)
        if (s / "recipe.yaml").is_file():
            shutil.copy2(s / "recipe.yaml", tmp / "recipe.yaml")
    return Path(dst).absolute()


def _read_recipe(d: Path) -> dict[str, Any] | None:
    p = d / "recipe.yaml"
    if not p.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _warn_lossy(name: str, scales: torch.Tensor, dtype: torch.dtype) -> None:
    if not torch.equal(scales.to(dtype).to(torch.float32), scales.to(torch.float32)):
        warnings.warn(f"{name}: scales change value when cast to {dtype} (the target format stores {dtype})",
                      stacklevel=3)
