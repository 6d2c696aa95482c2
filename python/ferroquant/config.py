"""Recipes: weight schemes, presets, ``config_groups``, targets/ignore matching, GPTQ options.

The shapes follow llm-compressor / compressed-tensors so a recipe written for one reads naturally
in the other: ``QuantizationArgs`` keeps compressed-tensors' field names, a config group is
``{targets, weights, input_activations}``, and the recipe is ``GPTQ(scheme=... | config_groups=...,
targets, ignore, ...)``.

Matching rules (:func:`match_target`, used for ``targets``, ``ignore`` and config groups):

* ``"re:<pattern>"`` - a Python regular expression tried with ``re.match`` against the module's
  full dotted name (anchored at the start only, as compressed-tensors does; end the pattern with
  ``$`` to anchor the end too), e.g. ``"re:.*self_attn\\.(q|k)_proj$"``.
* a plain string equal to the module's full dotted name, e.g. ``"model.layers.0.mlp.down_proj"``.
* a plain string equal to the name of the module's class or of any of its base classes, e.g.
  ``"Linear"``, ``"LlamaMLP"``. ``"Linear"`` also matches transformers' ``Conv1D`` (GPT-2's linear
  layer with a transposed weight), so the default ``targets=["Linear"]`` covers GPT-2 too.

``ignore`` wins over ``targets``. When several config groups match one module the most specific
match wins (full name > regex > class name); two groups matching at the same specificity is an
error. Only modules inside the decoder blocks are quantized by default; a module outside them
(``lm_head``) is quantized only when a target names it by full name or regex, never through a
class name such as ``"Linear"``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "GPTQ",
    "PRESET_SCHEMES",
    "QuantizationArgs",
    "QuantizationScheme",
    "match_specificity",
    "match_target",
    "preset_scheme",
]


class QuantizationArgs(BaseModel):
    """Weight quantization arguments, named as compressed-tensors names them."""

    model_config = ConfigDict(extra="forbid")

    num_bits: int = 4
    type: Literal["int"] = "int"
    symmetric: bool = True
    strategy: Literal["channel", "group"] = "group"
    group_size: int | None = 128
    actorder: Literal["static", "group"] | None = None
    observer: Literal["minmax", "mse"] = "minmax"
    dynamic: bool = False

    @property
    def effective_group_size(self) -> int:
        """-1 for per-channel, else the group size."""
        return -1 if self.strategy == "channel" or not self.group_size else int(self.group_size)

    @field_validator("num_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError(f"num_bits must be one of 2, 3, 4, 8 (the packed formats), got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v <= 0:
            raise ValueError(f"group_size must be a positive integer, -1 or null, got {v}")
        return v

    @model_validator(mode="after")
    def _strategy(self) -> QuantizationArgs:
        if self.dynamic:
            raise ValueError("dynamic=True is for activations; weights are quantized statically")
        if self.strategy == "group" and (self.group_size is None or self.group_size == -1):
            raise ValueError(
                "strategy='group' needs a positive group_size; use strategy='channel' for one "
                "grid per output row"
            )
        return self


class QuantizationScheme(BaseModel):
    """One config group: which modules it applies to and how their weights are quantized.
    Only weight-only schemes exist for now (``input_activations``/``output_activations`` must be
    null)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str]
    weights: QuantizationArgs
    input_activations: None = None
    output_activations: None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("targets")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a config group needs at least one target")
        for t in v:
            _check_pattern(t)
        return v


def _w(bits: int, symmetric: bool = True) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=128)


# Integer weight-only presets, group 128 (overridable with GPTQ.group_size). Note: compressed-
# tensors' own W8A16 is per-channel; ferroquant keeps group 128 for every preset (issue 3).
PRESET_SCHEMES: dict[str, QuantizationArgs] = {
    "W4A16": _w(4),
    "W4A16_ASYM": _w(4, symmetric=False),
    "W8A16": _w(8),
    "W3A16": _w(3),
    "W2A16": _w(2),
}


def preset_scheme(name: str) -> QuantizationArgs:
    """A copy of a preset's weight arguments (case-insensitive name)."""
    key = name.upper()
    if key not in PRESET_SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; presets are {', '.join(PRESET_SCHEMES)}")
    return PRESET_SCHEMES[key].model_copy(deep=True)


def _check_pattern(t: str) -> None:
    if not isinstance(t, str) or not t:
        raise ValueError(f"a target/ignore entry must be a non-empty string, got {t!r}")
    if t.startswith("re:"):
        try:
            re.compile(t[3:])
        except re.error as e:
            raise ValueError(f"invalid regular expression in {t!r}: {e}") from None


def _class_names(module: Any) -> set[str]:
    # a class name stands for a module where there is none (a checkpoint's config groups)
    names = {module} if isinstance(module, str) else {c.__name__ for c in type(module).__mro__}
    if "Conv1D" in names:  # transformers' Conv1D is a Linear with a transposed weight
        names.add("Linear")
    return names


def match_specificity(name: str, module: Any, target: str) -> int:
    """0 = no match; 3 = full-name match; 2 = regex match; 1 = class-name match. ``module`` is
    the module or the name of its class."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], name) is not None else 0
    if target == name:
        return 3
    return 1 if target in _class_names(module) else 0


def match_target(name: str, module: Any, target: str) -> bool:
    """Whether ``target`` (class name, full name or ``re:`` regex) matches the module."""
    return match_specificity(name, module, target) > 0


class GPTQ(BaseModel):
    """A GPTQ recipe.

    Args:
        scheme: a preset name (``W4A16``, ``W4A16_ASYM``, ``W8A16``, ``W3A16``, ``W2A16``) applied
            to ``targets``. Mutually exclusive with ``config_groups``; when both are absent the
            scheme is ``W4A16``.
        config_groups: ``{name: {targets, weights: QuantizationArgs}}`` for per-module schemes.
        targets: what ``scheme`` applies to (default every ``Linear`` in the decoder blocks).
        ignore: modules never quantized, whichever group matches them (default ``lm_head``).
        group_size: overrides every group's size (``-1`` = per output channel).
        block_size: GPTQ lazy-batch width.
        dampening_frac: damping as a fraction of ``mean(diag H)`` (GPTQ's ``damp_percent``);
            raised automatically when the Cholesky factorization fails (reported per layer).
        actorder: ``"static"`` (columns processed by descending Hessian diagonal, scale groups
            kept contiguous so ``g_idx`` is trivial and inference needs no reorder; the default,
            as in llm-compressor), ``"group"`` (groups follow the processing order, ``g_idx``
            is a permutation) or ``None``. Applies to every group whose weights do not set
            ``actorder`` themselves; setting it here *and* differently in a group is an error.
        true_sequential: inside a block, quantize the module subsets in execution order (q/k/v,
            then o_proj, then gate/up, then down_proj), each seeing inputs that already carry
            the earlier subsets' quantization error.
        observer: overrides every group's observer (``minmax`` or ``mse`` grid search).
        offload_hessians: keep Hessians in host memory when blocks are quantized on a GPU (less
            GPU memory, a host copy of every activation batch); on the CPU they live there anyway.
        forward_dtype: the dtype the decoder blocks compute in while they are calibrated
            (``"bfloat16"``, ``"float16"``, ``"float32"``; default ``None``: the model's own).
            The block being quantized runs as a copy in that dtype, the activations passed
            between blocks are kept in it, and the Hessians are accumulated in float32 from
            them; the weights are still quantized from their original precision and the
            dequantized values written back in it. ``"bfloat16"`` on a float32 model roughly
            halves the block forwards and their memory on CPUs with native bf16 arithmetic
            (AVX512-BF16, AMX) and on GPUs, at bf16 activation precision - what calibrating a
            bf16 checkpoint sees anyway.
        kv_cache_scheme: must be null - KV-cache quantization is not implemented yet.
        sequential_targets: the decoder blocks, when automatic discovery fails or picks the wrong
            list: a dotted path to an ``nn.ModuleList`` (``"model.layers"``) or a block class
            name (``"LlamaDecoderLayer"``); a list gives several candidates, the first found wins.
        unreached_policy: what to do with a target that no calibration token reached (e.g. an
            unrouted expert): ``"rtn"`` round-to-nearest with a warning and a note in the report,
            or ``"error"``.
    """

    model_config = ConfigDict(extra="forbid")

    scheme: str | None = None
    config_groups: dict[str, QuantizationScheme] | None = None
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    group_size: int | None = None
    block_size: int = 128
    dampening_frac: float = 0.01
    actorder: Literal["static", "group"] | None = "static"
    true_sequential: bool = True
    observer: Literal["minmax", "mse"] | None = None
    offload_hessians: bool = False
    forward_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    kv_cache_scheme: dict[str, Any] | None = None
    sequential_targets: list[str] | None = None
    unreached_policy: Literal["rtn", "error"] = "rtn"

    @field_validator("targets", "ignore", "sequential_targets", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("forward_dtype", mode="before")
    @classmethod
    def _forward_dtype(cls, v: Any) -> Any:
        # accept torch dtypes and their short names ("torch.bfloat16", "bf16", "fp16", ...)
        if v is None:
            return None
        s = str(v).lower().removeprefix("torch.")
        if s in ("model", "auto", "none"):
            return None
        return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32"}.get(s, s)

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        return None if v is None else v.upper()

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for t in v:
            _check_pattern(t)
        return v

    @field_validator("actorder", mode="before")
    @classmethod
    def _actorder(cls, v: Any) -> Any:
        # YAML/CLI spellings of "off"
        if isinstance(v, str) and v.lower() in ("none", "null", "false", "off"):
            return None
        if v is False:
            return None
        return v

    @model_validator(mode="after")
    def _check(self) -> GPTQ:
        if self.scheme is not None and self.config_groups is not None:
            raise ValueError("give either scheme or config_groups, not both")
        if self.scheme is not None:
            preset_scheme(self.scheme)  # validates the name
        if self.config_groups is not None and not self.config_groups:
            raise ValueError("config_groups is empty")
        if "targets" in self.model_fields_set and self.config_groups is not None:
            raise ValueError("targets applies to scheme; with config_groups give each group's "
                             "targets instead")
        if not self.targets:
            raise ValueError("targets is empty")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0.0 < self.dampening_frac <= 1.0:
            raise ValueError(f"dampening_frac must be in (0, 1], got {self.dampening_frac}")
        if self.kv_cache_scheme is not None:
            raise NotImplementedError(
                "kv_cache_scheme is not supported yet (ferroquant quantizes weights only); "
                "remove it from the recipe"
            )
        self.resolved_groups()  # surfaces actorder conflicts at construction time
        return self

    # ---------------------------------------------------------------------------------------
    # resolution
    # ---------------------------------------------------------------------------------------

    def resolved_groups(self) -> dict[str, QuantizationScheme]:
        """The config groups with recipe-level overrides (group_size, actorder, observer) applied."""
        if self.config_groups is not None:
            groups = {k: g.model_copy(deep=True) for k, g in self.config_groups.items()}
        else:
            name = (self.scheme or "W4A16").upper()
            groups = {
                "group_0": QuantizationScheme(targets=list(self.targets),
                                              weights=preset_scheme(name))
            }
        out: dict[str, QuantizationScheme] = {}
        for key, g in groups.items():
            w = g.weights
            upd: dict[str, Any] = {}
            if self.group_size is not None:
                if self.group_size == -1:
                    upd.update(strategy="channel", group_size=None)
                else:
                    upd.update(strategy="group", group_size=self.group_size)
            if "actorder" in w.model_fields_set:
                if "actorder" in self.model_fields_set and w.actorder != self.actorder:
                    raise ValueError(
                        f"config group {key!r} sets actorder={w.actorder!r} but the recipe sets "
                        f"actorder={self.actorder!r}; set it in one place"
                    )
            else:
                upd["actorder"] = self.actorder
            if self.observer is not None:
                upd["observer"] = self.observer
            merged = {**w.model_dump(), **upd}
            out[key] = QuantizationScheme(targets=g.targets,
                                          weights=QuantizationArgs.model_validate(merged))
        return out

    def args_for(self, name: str, module: Any, *, in_block: bool = True,
                 groups: dict[str, QuantizationScheme] | None = None
                 ) -> QuantizationArgs | None:
        """The weight arguments for module ``name``, or None if it is not to be quantized.
        ``in_block=False`` (a module outside the decoder blocks) only matches by full name or
        regex, never by class name."""
        if any(match_target(name, module, t) for t in self.ignore):
            return None
        groups = self.resolved_groups() if groups is None else groups
        best: tuple[int, str, QuantizationArgs] | None = None
        for key, g in groups.items():
            spec = max((match_specificity(name, module, t) for t in g.targets), default=0)
            if spec == 0 or (not in_block and spec < 2):
                continue
            if best is None or spec > best[0]:
                best = (spec, key, g.weights)
            elif spec == best[0]:
                raise ValueError(
                    f"module {name!r} is matched by config groups {best[1]!r} and {key!r} "
                    "equally specifically; make one target more specific or add it to ignore"
                )
        return None if best is None else best[2]

    # ---------------------------------------------------------------------------------------
    # (de)serialization
    # ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready, such that ``GPTQ.from_dict(r.to_dict()) == r`` with the same
        resolved groups: config-group weights keep only the fields that were set, and
        ``actorder`` is written only when it was set explicitly (an explicit recipe-level
        actorder must not start to conflict with a group's own on reload)."""
        d = self.model_dump(mode="json")
        if self.config_groups is not None:
            d["config_groups"] = {k: g.model_dump(mode="json", exclude_unset=True)
                                  for k, g in self.config_groups.items()}
            del d["targets"]
        if "actorder" not in self.model_fields_set:
            del d["actorder"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTQ:
        if not isinstance(d, dict):
            raise TypeError(f"a recipe must be a mapping, got {type(d).__name__}")
        # accept llm-compressor's nesting: {"GPTQModifier": {...}} or a full recipe
        # {"quant_stage": {"quant_modifiers": {"GPTQModifier": {...}}}}
        d = _unwrap_modifier(d)
        return cls.model_validate(d)

    def to_file(self, path: str | Path) -> Path:
        """Writes the recipe as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        p = Path(path)
        d = self.to_dict()
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(d, sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(d, indent=2) + "\n"
        else:
            raise ValueError(f"recipe file {str(p)!r}: use a .yaml, .yml or .json extension")
        p.write_text(text, encoding="utf-8")
        return p

    @classmethod
    def from_file(cls, path: str | Path) -> GPTQ:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot read recipe file {str(p)!r}: {e}") from e
        suffix = p.suffix.lower()
        try:
            d = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"recipe file {str(p)!r} is not valid "
                             f"{'JSON' if suffix == '.json' else 'YAML'}: {e}") from None
        if d is None:
            raise ValueError(f"recipe file {str(p)!r} is empty")
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise TypeError(f"recipe file {str(p)!r}: {e}") from e
        except ValueError as e:  # includes pydantic's ValidationError
            raise ValueError(f"recipe file {str(p)!r}: {e}") from e

    @classmethod
    def coerce(cls, recipe: GPTQ | dict[str, Any] | str | Path) -> GPTQ:
        """A GPTQ object from a GPTQ, a dict, a preset name or a YAML/JSON path."""
        if isinstance(recipe, GPTQ):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, Path)):
            if isinstance(recipe, str) and recipe.upper() in PRESET_SCHEMES:
                return cls(scheme=recipe)
            return cls.from_file(recipe)
        raise TypeError(f"recipe must be a GPTQ, a dict, a preset name or a path to a YAML/JSON "
                        f"file, got {type(recipe).__name__}")


def _unwrap_modifier(d: dict[str, Any]) -> dict[str, Any]:
    for _ in range(4):
        if len(d) == 1:
            (key, val), = d.items()
            if isinstance(val, dict) and (key == "GPTQModifier"
                                          or key.endswith(("_stage", "_modifiers"))):
                d = val
                continue
        break
    return d
