"""compressed-tensors settings from a checkpoint's config (each module's group: weights,
activations, storage format; the KV-cache scheme) and each quantized layer's tensors checked
against them from the safetensors headers (and the 2-integer ``weight_shape``); no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import OBSERVERS, ActivationArgs, QuantizationArgs, match_specificity, match_target
from .common import n_groups_for
from .files import FLOAT_CODES, CheckpointError, HeaderFiles

PACK, INT, FLOAT, NAIVE = "pack-quantized", "int-quantized", "float-quantized", "naive-quantized"
MIXED = "mixed-precision"


def quantized_prefixes(files: HeaderFiles) -> list[str]:
    """Every module with a ``weight_scale``: what every compressed-tensors layout writes."""
    return sorted(n[: -len(".weight_scale")] for n in files.names() if n.endswith(".weight_scale"))


def args_from_dict(d: Any, where: str) -> ActivationArgs:
    """A config's activation arguments; observers ferroquant does not know are dropped (the
    scales are in the checkpoint already)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected quantization arguments, got {d!r}")
    try:
        return ActivationArgs(
            num_bits=int(d.get("num_bits", 8)),
            type=d.get("type", "int"),
            symmetric=bool(d.get("symmetric", True)),
            strategy=d.get("strategy"),
            group_size=d.get("group_size"),
            dynamic=d.get("dynamic", False),
            observer=d.get("observer") if not d.get("dynamic") and d.get("observer") in OBSERVERS
            else None,
        )
    except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{where}: {e}") from None


def _weights_args(w: dict[str, Any], where: str) -> QuantizationArgs:
    wtype = str(w.get("type", "int")).lower()
    strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
    allowed = ("tensor", "channel") if wtype == "float" else ("group", "channel")
    if strategy not in allowed:
        raise CheckpointError(f"{where}: {wtype} weights with strategy {strategy!r} are not "
                              f"supported ({' or '.join(allowed)})")
    actorder = w.get("actorder")
    if actorder in ("weight", "static"):
        actorder = "static"
    elif actorder in ("group", "dynamic", True):
        actorder = "group"
    else:
        actorder = None
    try:
        return QuantizationArgs(
            num_bits=int(w.get("num_bits", 8)),
            type=wtype,
            symmetric=bool(w.get("symmetric", True)),
            strategy=strategy,
            group_size=int(w["group_size"]) if strategy == "group" else None,
            actorder=actorder,
            observer=w.get("observer") if w.get("observer") in ("mse", "hessian_mse")
            else "minmax",
        )
    except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{where}: {e}") from None


@dataclass
class GroupScheme:
    """One config group as read: its weights, activations and storage format."""

    name: str
    weights: QuantizationArgs
    input_activations: ActivationArgs | None
    output_activations: ActivationArgs | None
    format: str


class CTSettings:
    """Resolves each module's scheme from ``config_groups`` targets (exact names, ``re:``
    regexes, or class names such as ``Linear``) and ``ignore``; each group's format is its own
    ``format`` or, unless that is ``mixed-precision``, the config's."""

    def __init__(self, qc: dict[str, Any], source: str) -> None:
        self.source = source
        top = qc.get("format")
        known = (PACK, INT, FLOAT, NAIVE)
        if top not in (*known, MIXED):
            raise CheckpointError(
                f"{source}: compressed-tensors format {top!r} is not supported "
                f"({', '.join(known)} or {MIXED})"
            )
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{source}: compressed-tensors config has no config_groups")
        self.groups: list[tuple[list[str], GroupScheme]] = []
        for gname, g in groups.items():
            where = f"{source}: config_groups.{gname}"
            if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
                raise CheckpointError(f"{where} has no 'weights' arguments")
            fmt = g.get("format") or top
            if fmt not in known:
                raise CheckpointError(f"{where}: format {fmt!r} is not supported "
                                      f"({', '.join(known)})")
            args = _weights_args(g["weights"], f"{where}.weights")
            if fmt != NAIVE and (fmt == FLOAT) != (args.type == "float"):
                raise CheckpointError(f"{where}: format {fmt!r} cannot hold {args.type} weights")
            ins, outs = (None if g.get(k) is None else args_from_dict(g[k], f"{where}.{k}")
                         for k in ("input_activations", "output_activations"))
            scheme = GroupScheme(str(gname), args, ins, outs, fmt)
            self.groups.append((list(g.get("targets") or []), scheme))
        self.ignore = list(qc.get("ignore") or [])
        kv = qc.get("kv_cache_scheme")
        self.kv_cache = None if kv is None else args_from_dict(kv, f"{source}: kv_cache_scheme")

    def scheme_for(self, name: str, module: Any = "Linear") -> GroupScheme | None:
        """The most specific matching group (full name > regex > class name, the recipe's own
        rule: :func:`ferroquant.config.match_specificity`); ``module`` is the module or its
        class name. The first of equally specific groups wins (a reader is lenient)."""
        if any(match_target(name, module, t) for t in self.ignore):
            return None
        best: tuple[int, GroupScheme] | None = None
        for targets, scheme in self.groups:
            spec = max((match_specificity(name, module, t) for t in targets), default=0)
            if spec and (best is None or spec > best[0]):
                best = (spec, scheme)
        return None if best is None else best[1]

    def for_module(self, name: str, module: Any = "Linear") -> QuantizationArgs | None:
        """The weights args of :meth:`scheme_for`'s group."""
        s = self.scheme_for(name, module)
        return None if s is None else s.weights


@dataclass
class LayerHeader:
    """One quantized layer's args and shape, checked from the headers (and ``weight_shape``)."""

    args: QuantizationArgs
    in_features: int
    out_features: int
    n_groups: int
    why: str
    scheme: GroupScheme | None = None


def check_layer_header(
    files: HeaderFiles, prefix: str, settings: CTSettings,
    in_features: int | None = None, out_features: int | None = None,
) -> LayerHeader:
    """Check presence, dtypes and shapes of one layer's tensors against the config (and the
    model's layer shape where known); of the data only the 2-integer ``weight_shape`` is read."""
    scheme = settings.scheme_for(prefix)
    if scheme is None:
        raise CheckpointError(
            f"{files.dir}: '{prefix}.weight_scale' exists but no config group in {settings.source} targets '{prefix}'"
        )
    if scheme.format != PACK:
        return _check_dense_header(files, prefix, settings, scheme, in_features, out_features)
    args = scheme.weights
    b = int(args.num_bits)
    shp = files.expect(f"{prefix}.weight_shape", ("I64", "I32"), (2,))
    ws = files.read_ints(f"{prefix}.weight_shape")
    out, inp = ws
    gs, ng = _shape_and_groups(shp.file, prefix, f"tensor '{prefix}.weight_shape' is {ws}",
                               (out, inp), (out_features, in_features), args, settings)
    why = f"bits={b}, group_size={gs} from {settings.source}, weight_shape={ws}"
    files.expect(f"{prefix}.weight_packed", "I32", (out, -(-inp * b // 32)), why)
    files.expect(f"{prefix}.weight_scale", FLOAT_CODES, (out, ng), why)
    if args.symmetric:
        if f"{prefix}.weight_zero_point" in files:
            raise CheckpointError(
                f"{files.info(prefix + '.weight_zero_point').file}: tensor '{prefix}.weight_zero_point' "
                f"present but {settings.source} says symmetric"
            )
    else:
        files.expect(f"{prefix}.weight_zero_point", "I32", (-(-out * b // 32), ng), why)
    if f"{prefix}.weight_g_idx" in files:
        files.expect(f"{prefix}.weight_g_idx", ("I32", "I64"), (inp,), why)
    return LayerHeader(args, inp, out, ng, why, scheme)


def _shape_and_groups(file: str, prefix: str, what: str, shape: tuple[int, int],
                      model_shape: tuple[int | None, int | None], args: Any,
                      settings: CTSettings) -> tuple[int, int]:
    """(group size, groups) of a layer whose stored shape must match the model's layer (where
    known) and hold whole groups."""
    (out, inp), (out_m, in_m) = shape, model_shape
    if (out_m is not None and out != out_m) or (in_m is not None and inp != in_m):
        raise CheckpointError(f"{file}: {what} but the model's layer is [{out_m}, {in_m}]")
    gs = args.effective_group_size
    if gs > 0 and inp % gs:
        raise CheckpointError(f"{file}: '{prefix}': in_features={inp} is not a multiple of "
                              f"group_size={gs} from {settings.source}")
    return gs, n_groups_for(inp, gs)


def _check_dense_header(
    files: HeaderFiles, prefix: str, settings: CTSettings, scheme: GroupScheme,
    in_features: int | None, out_features: int | None,
) -> LayerHeader:
    """int-/float-quantized: the unpacked ``weight`` gives the layer's shape."""
    args = scheme.weights
    is_float = args.type == "float"
    w = files.expect(f"{prefix}.weight", "F8_E4M3" if is_float else "I8", None,
                     f"{scheme.format} from {settings.source}")
    if len(w.shape) != 2:
        raise CheckpointError(f"{w.file}: tensor '{prefix}.weight' has shape {list(w.shape)}, "
                              "expected [out, in]")
    out, inp = (int(v) for v in w.shape)
    _, ng = _shape_and_groups(w.file, prefix, f"tensor '{prefix}.weight' has shape {[out, inp]}",
                               (out, inp), (out_features, in_features), args, settings)
    scale_shape: tuple[int, ...] = (1,) if args.strategy == "tensor" else (out, ng)
    why = f"{scheme.format}, {args.describe()} from {settings.source}, weight [{out}, {inp}]"
    files.expect(f"{prefix}.weight_scale", FLOAT_CODES, scale_shape, why)
    if args.symmetric:
        if f"{prefix}.weight_zero_point" in files:
            raise CheckpointError(
                f"{files.info(prefix + '.weight_zero_point').file}: tensor '{prefix}.weight_zero_point' "
                f"present but {settings.source} says symmetric"
            )
    else:
        files.expect(f"{prefix}.weight_zero_point", "I8", (out, ng), why)
    return LayerHeader(args, inp, out, ng, why, scheme)
