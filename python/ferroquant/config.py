"""Recipes: weight and activation schemes, presets, ``config_groups``, ``kv_cache_scheme``,
targets/ignore matching, GPTQ options.

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
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "GPTQ",
    "OBSERVERS",
    "PRESET_SCHEMES",
    "ActivationArgs",
    "QuantizationArgs",
    "QuantizationScheme",
    "match_specificity",
    "match_target",
    "preset",
    "preset_scheme",
]


OBSERVERS = ("minmax", "static_minmax", "moving_average_minmax", "mse")
# weights are observed once: min-max, the shrink-grid search, or the search weighted by diag(H)
WEIGHT_OBSERVERS = ("minmax", "mse", "hessian_mse")
_OBSERVER_KWARGS = {"averaging_constant", "grid", "maxshrink", "norm"}


class _Args(BaseModel):
    """What weights and activations share: compressed-tensors' ``QuantizationArgs`` fields."""

    model_config = ConfigDict(extra="forbid")

    num_bits: int = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    strategy: Literal["tensor", "channel", "group", "token", "attn_head"] | None = None
    group_size: int | None = None
    observer: str | None = None
    observer_kwargs: dict[str, float] = Field(default_factory=dict)
    dynamic: bool | Literal["local"] = False

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v <= 0:
            raise ValueError(f"group_size must be a positive integer, -1 or null, got {v}")
        return v

    @field_validator("observer", mode="before")
    @classmethod
    def _observer(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("none", "null", "memoryless"):
            return None
        known = dict.fromkeys(OBSERVERS + WEIGHT_OBSERVERS)
        if v is not None and v not in known:
            raise ValueError(f"unknown observer {v!r}; observers are {', '.join(known)}")
        return v

    @field_validator("observer_kwargs")
    @classmethod
    def _observer_kwargs(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - _OBSERVER_KWARGS
        if unknown:
            raise ValueError(f"unknown observer_kwargs {sorted(unknown)}; known: "
                             f"{sorted(_OBSERVER_KWARGS)}")
        c = v.get("averaging_constant")
        if c is not None and not 0.0 < c <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {c}")
        return v

    def _check_type(self, what: str) -> None:
        if self.type == "float":
            if self.num_bits != 8:
                raise ValueError(f"{what}: type 'float' is FP8 (E4M3), so num_bits must be 8, "
                                 f"got {self.num_bits}")
            if not self.symmetric:
                raise ValueError(f"{what}: FP8 (type 'float') is symmetric only")

    @property
    def effective_group_size(self) -> int:
        """-1 for one scale per row (channel, token, tensor), else the group size."""
        return int(self.group_size) if self.strategy == "group" and self.group_size else -1

    def describe(self) -> str:
        """``int8 per-token dynamic (symmetric)``, ``fp8 per-tensor static (static_minmax)``."""
        kind = f"fp{self.num_bits}" if self.type == "float" else f"int{self.num_bits}"
        where = (f"group {self.group_size}" if self.strategy == "group"
                 else {"attn_head": "per-head"}.get(str(self.strategy), f"per-{self.strategy}"))
        how = "dynamic" if self.dynamic else "static"
        extra = "symmetric" if self.symmetric else "asymmetric"
        if not self.dynamic and self.observer:
            extra += f", {self.observer}"
        return f"{kind} {where} {how} ({extra})"


class QuantizationArgs(_Args):
    """Weight quantization arguments, named as compressed-tensors names them: integer grids of
    2, 3, 4 or 8 bits per channel or per group (solved by GPTQ or rounded to nearest), or FP8
    (``type: float``) per tensor or per channel (rounded to nearest)."""

    num_bits: int = 4
    strategy: Literal["tensor", "channel", "group", "token", "attn_head"] | None = "group"
    group_size: int | None = 128
    actorder: Literal["static", "group", "group_aware"] | None = None
    observer: str | None = "minmax"

    @field_validator("num_bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError(f"num_bits must be one of 2, 3, 4, 8 (the packed formats), got {v}")
        return v

    @model_validator(mode="after")
    def _strategy(self) -> QuantizationArgs:
        if self.dynamic:
            raise ValueError("dynamic=True is for activations; weights are quantized statically")
        self._check_type("weights")
        if self.observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"weights: observer {self.observer!r}: weights are observed once, "
                             f"with {', '.join(map(repr, WEIGHT_OBSERVERS))}")
        if self.type == "float":
            if self.strategy not in ("tensor", "channel"):
                raise ValueError(f"FP8 weights: strategy must be 'tensor' or 'channel', got "
                                 f"{self.strategy!r}")
            if self.actorder is not None:
                raise ValueError("FP8 weights: actorder is for GPTQ's integer grids")
            return self
        if self.strategy not in ("channel", "group"):
            raise ValueError(f"integer weights: strategy must be 'channel' or 'group', got "
                             f"{self.strategy!r}")
        if self.strategy == "group" and (self.group_size is None or self.group_size == -1):
            raise ValueError(
                "strategy='group' needs a positive group_size; use strategy='channel' for one "
                "grid per output row"
            )
        return self


class ActivationArgs(_Args):
    """Arguments for ``input_activations``, ``output_activations`` and ``kv_cache_scheme``.

    ``dynamic: true`` (or ``"local"``, the same here: no global scale) computes scales from each
    tensor as it flows - per ``token`` (row), per ``tensor`` or per ``group`` - and needs no
    observer. ``dynamic: false`` calibrates one static scale per tensor (``strategy: tensor``;
    per KV head, ``attn_head``, for the KV cache) with an observer: ``minmax`` is
    llm-compressor's moving average of each batch's range (``averaging_constant``, default
    0.01; ``moving_average_minmax`` is the same), ``static_minmax`` the absolute range over all
    batches, ``mse`` a shrink-grid search of the range. The default strategy is ``group`` when
    a ``group_size`` is given, else ``tensor``."""

    @model_validator(mode="after")
    def _check(self) -> ActivationArgs:
        self._check_type("activations")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise ValueError(f"activations: observer {self.observer!r} is for weights; "
                             f"activation observers are {', '.join(OBSERVERS)}")
        if self.type == "int" and not 2 <= self.num_bits <= 8:
            raise ValueError(f"activations: int num_bits must be 2..8, got {self.num_bits}")
        if self.strategy is None:
            self.strategy = "group" if self.group_size not in (None, -1) else "tensor"
        if self.strategy == "group" and self.group_size in (None, -1):
            raise ValueError(f"{self.type} activations with strategy 'group' need a positive "
                             "group_size")
        if self.strategy != "group" and self.group_size not in (None, -1):
            raise ValueError(f"group_size={self.group_size} is only for strategy 'group', "
                             f"not {self.strategy!r}")
        if self.dynamic:
            if self.observer is not None:
                raise ValueError(f"dynamic={self.dynamic!r} computes scales at run time: "
                                 f"remove observer {self.observer!r}")
            if self.strategy not in ("token", "tensor", "group"):
                raise ValueError("dynamic activation scales are per 'token', 'tensor' or "
                                 f"'group', not {self.strategy!r}")
        elif self.strategy not in ("tensor", "attn_head"):
            hint = " (set dynamic: true)" if self.strategy in ("token", "group") else ""
            raise ValueError(f"static activation scales are per 'tensor' (or 'attn_head' for the "
                             f"KV cache), not {self.strategy!r}{hint}")
        return self

    @property
    def calibrated(self) -> bool:
        """Whether scales come from calibration (static) rather than each forward."""
        return not self.dynamic

    @property
    def observer_name(self) -> str:
        """The observer a static scheme uses (llm-compressor's default: ``minmax``)."""
        return self.observer or "minmax"


class QuantizationScheme(BaseModel):
    """One config group: which modules it applies to, how their weights are quantized, and
    (optionally) their input and output activations."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str]
    weights: QuantizationArgs
    input_activations: ActivationArgs | None = None
    output_activations: ActivationArgs | None = None

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

    @model_validator(mode="after")
    def _activations(self) -> QuantizationScheme:
        for kind in ("input_activations", "output_activations"):
            a = getattr(self, kind)
            if a is not None and a.strategy == "attn_head":
                raise ValueError(f"{kind}: strategy 'attn_head' is for kv_cache_scheme only")
        out = self.output_activations
        if out is not None and not out.dynamic:
            raise ValueError("output_activations: only dynamic output quantization is supported "
                             "(static output scales are not calibrated yet); set dynamic: true")
        return self


def _w(bits: int, symmetric: bool = True) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=128)


_INT8_CHANNEL = QuantizationArgs(num_bits=8, strategy="channel", group_size=None)
_INT8_TOKEN = ActivationArgs(num_bits=8, strategy="token", dynamic=True)
_FP8_TOKEN = ActivationArgs(type="float", strategy="token", dynamic=True)

# Presets: weights (and input activations), compressed-tensors' where it has the name. Integer
# weight-only presets use group 128 (overridable with GPTQ.group_size); compressed-tensors' own
# W8A16 is per-channel, ferroquant keeps group 128 for every weight-only preset.
PRESET_SCHEMES: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": _w(4)},
    "W4A16_ASYM": {"weights": _w(4, symmetric=False)},
    "W8A16": {"weights": _w(8)},
    "W3A16": {"weights": _w(3)},
    "W2A16": {"weights": _w(2)},
    # int8 per-channel weights, int8 activations per token computed at run time
    "W8A8": {"weights": _INT8_CHANNEL, "input_activations": _INT8_TOKEN},
    # int8 per-channel weights, one calibrated int8 activation scale per layer
    "W8A8_STATIC": {"weights": _INT8_CHANNEL,
                    "input_activations": ActivationArgs(num_bits=8, strategy="tensor",
                                                        observer="static_minmax")},
    # FP8 weights per tensor, one calibrated FP8 activation scale per layer
    "FP8": {"weights": QuantizationArgs(num_bits=8, type="float", strategy="tensor",
                                        group_size=None),
            "input_activations": ActivationArgs(type="float", strategy="tensor",
                                                observer="static_minmax")},
    # FP8 weights per channel, FP8 activations per token computed at run time
    "FP8_DYNAMIC": {"weights": QuantizationArgs(num_bits=8, type="float", strategy="channel",
                                                group_size=None),
                    "input_activations": _FP8_TOKEN},
    # int4 group-128 weights (GPTQ), int8 activations per token computed at run time
    "W4A8": {"weights": _w(4), "input_activations": _INT8_TOKEN},
    "W4AFP8": {"weights": _w(4), "input_activations": _FP8_TOKEN},
}


def preset(name: str, targets: list[str]) -> QuantizationScheme:
    """A preset applied to ``targets`` (case-insensitive name); a fresh copy each call."""
    key = name.upper()
    if key not in PRESET_SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; presets are {', '.join(PRESET_SCHEMES)}")
    return QuantizationScheme(targets=list(targets), **{
        k: v.model_copy(deep=True) for k, v in PRESET_SCHEMES[key].items()})


def preset_scheme(name: str) -> QuantizationArgs:
    """A copy of a preset's weight arguments (case-insensitive name)."""
    return preset(name, ["Linear"]).weights


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
        scheme: a preset name applied to ``targets``: weight-only ``W4A16``, ``W4A16_ASYM``,
            ``W8A16``, ``W3A16``, ``W2A16``; with activations ``W8A8`` (int8 per-channel
            weights, dynamic per-token int8 activations), ``W8A8_STATIC`` (static per-tensor
            activation scales), ``FP8`` (FP8 weights and static per-tensor activations),
            ``FP8_DYNAMIC`` (per-channel FP8 weights, dynamic per-token activations), ``W4A8``
            and ``W4AFP8`` (int4 group-128 weights, dynamic per-token int8 / FP8 activations).
            Or a dict ``{preset: targets}`` (``{"W8A8": ["re:.*self_attn.*"], "W4A16":
            ["re:.*mlp.*"]}``), one config group per preset. Mutually exclusive with
            ``config_groups``; when both are absent the scheme is ``W4A16``.
        config_groups: ``{name: {targets, weights, input_activations, output_activations}}``
            for per-module schemes (:class:`QuantizationArgs`, :class:`ActivationArgs`).
        targets: what ``scheme`` applies to (default every ``Linear`` in the decoder blocks).
        ignore: modules never quantized, whichever group matches them (default ``lm_head``).
        group_size: overrides every group's size (``-1`` = per output channel).
        block_size: GPTQ lazy-batch width.
        dampening_frac: damping as a fraction of ``mean(diag H)`` (GPTQ's ``damp_percent``);
            raised automatically when the Cholesky factorization fails (reported per layer).
        actorder: ``"static"`` (columns processed by descending Hessian diagonal, scale groups
            kept contiguous so ``g_idx`` is trivial and inference needs no reorder; the default,
            as in llm-compressor; grids fitted up front on the original weights), ``"group"``
            (groups follow the processing order, ``g_idx`` is a permutation),
            ``"group_aware"`` (GAR, GPTQModel's ``act_group_aware``: whole groups processed in
            turn by descending max diagonal, the columns of each by descending diagonal, each
            grid fitted when its group starts on the already compensated columns; ``g_idx``
            trivial, stored as ``static``; CPU solver) or ``None``. Applies to every group whose weights do not set
            ``actorder`` themselves; setting it here *and* differently in a group is an error.
        true_sequential: inside a block, quantize the module subsets in execution order (q/k/v,
            then o_proj, then gate/up, then down_proj), each seeing inputs that already carry
            the earlier subsets' quantization error.
        observer: overrides every group's observer: ``minmax``, ``mse`` (a shrink-grid search
            per group minimising the weights' own rounding error) or ``hessian_mse`` (the same
            search minimising the squared error weighted by diag(H), i.e. as the layer's outputs
            see it, run by GPTQ when it fits each group inside its column loop; round-to-nearest
            has no Hessian and uses the unweighted squared error).
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
        kv_cache_scheme: quantizes what the attention caches - its keys and values after the
            rotary embedding, at the cache's update - with calibrated static scales per tensor
            (``strategy: tensor``) or per KV head (``attn_head``), written as compressed-tensors'
            ``k_scale``/``v_scale`` (:class:`ActivationArgs`; e.g. ``{num_bits: 8, type: float,
            strategy: tensor}`` for an FP8 cache).
        sequential_targets: the decoder blocks, when automatic discovery fails or picks the wrong
            list: a dotted path to an ``nn.ModuleList`` (``"model.layers"``) or a block class
            name (``"LlamaDecoderLayer"``); a list gives several candidates, the first found wins.
        unreached_policy: what to do with a target that no calibration token reached (e.g. an
            unrouted expert): ``"rtn"`` round-to-nearest with a warning and a note in the report,
            or ``"error"``.
        gptaq_alpha: GPTAQ (Li et al., ICML 2025; 0.25 in the paper): each layer is fitted to the
            FLOAT model's output rather than to its own inputs' - beside the Hessian the float
            model's inputs X of every target are run (one more forward per block) and
            ``(X - X~) X~^T`` accumulated; this weighs the extra error-compensation term.
            ``None`` or 0: plain GPTQ (the default). CPU solver only.
        qronos: Qronos (Zhang et al., ICLR 2026): like GPTAQ it runs the float model's inputs
            beside the quantized ones, then fits each layer to the float model's output in
            closed form - the first column refitted against it, every later one refitted by
            least squares given the quantized first, then GPTQ's error diffusion (ridge: the
            recipe's ``dampening_frac``). Not together with ``gptaq_alpha``. CPU solver only.
    """

    model_config = ConfigDict(extra="forbid")

    scheme: str | dict[str, list[str]] | None = None
    config_groups: dict[str, QuantizationScheme] | None = None
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    group_size: int | None = None
    block_size: int = 128
    dampening_frac: float = 0.01
    actorder: Literal["static", "group", "group_aware"] | None = "static"
    true_sequential: bool = True
    observer: Literal["minmax", "mse", "hessian_mse"] | None = None
    offload_hessians: bool = False
    forward_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    kv_cache_scheme: ActivationArgs | None = None
    sequential_targets: list[str] | None = None
    unreached_policy: Literal["rtn", "error"] = "rtn"
    gptaq_alpha: float | None = None
    qronos: bool = False

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

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.upper()
        if isinstance(v, dict):  # {preset: targets}
            return {str(k).upper(): [t] if isinstance(t, str) else t for k, t in v.items()}
        return v

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

    @field_validator("gptaq_alpha")
    @classmethod
    def _gptaq_alpha(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"gptaq_alpha must be a finite number >= 0 (or None), got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> GPTQ:
        if self.scheme is not None and self.config_groups is not None:
            raise ValueError("give either scheme or config_groups, not both")
        if self.qronos and self.gptaq_alpha:
            raise ValueError("qronos and gptaq_alpha are two ways of fitting to the float "
                             "model's output; give one of them")
        if isinstance(self.scheme, dict):
            if not self.scheme:
                raise ValueError("scheme is an empty dict; give {preset: targets}")
            if "targets" in self.model_fields_set:
                raise ValueError("scheme as a dict {preset: targets} carries its own targets; "
                                 "drop targets")
            for name, ts in self.scheme.items():
                preset(name, ts)  # validates the name and the targets
        elif self.scheme is not None:
            preset(self.scheme, self.targets)  # validates the name
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
        kv = self.kv_cache_scheme
        if kv is not None:
            if kv.dynamic:
                raise ValueError("kv_cache_scheme: the KV cache takes calibrated static scales "
                                 "(k_scale/v_scale, what vLLM reads); set dynamic: false")
            if not kv.symmetric:
                raise ValueError("kv_cache_scheme: only symmetric KV-cache quantization is "
                                 "supported (vLLM has no KV zero points)")
        self.resolved_groups()  # surfaces actorder conflicts at construction time
        return self

    # ---------------------------------------------------------------------------------------
    # resolution
    # ---------------------------------------------------------------------------------------

    def resolved_groups(self) -> dict[str, QuantizationScheme]:
        """The config groups with recipe-level overrides (group_size, actorder, observer) applied."""
        if self.config_groups is not None:
            groups = {k: g.model_copy(deep=True) for k, g in self.config_groups.items()}
        elif isinstance(self.scheme, dict):
            groups = {f"group_{i}": preset(name, ts)
                      for i, (name, ts) in enumerate(self.scheme.items())}
        else:
            groups = {"group_0": preset(self.scheme or "W4A16", self.targets)}
        out: dict[str, QuantizationScheme] = {}
        for key, g in groups.items():
            w = g.weights
            upd: dict[str, Any] = {}
            if w.type == "float":  # FP8 weights: round-to-nearest per tensor/channel
                if self.group_size is not None:
                    raise ValueError(f"config group {key!r} has FP8 weights; the recipe's "
                                     f"group_size={self.group_size} applies to integer weights")
                out[key] = g
                continue
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
            out[key] = g.model_copy(update={"weights": QuantizationArgs.model_validate(merged)})
        return out

    def beyond_integer_weights(self) -> list[str]:
        """What the recipe quantizes besides integer weights (activations, FP8 weights, the
        KV cache), one phrase each: what a weight-only format such as GPTQ cannot hold."""
        out = []
        for key, g in self.resolved_groups().items():
            if g.weights.type == "float":
                out.append(f"config group {key!r}: FP8 weights")
            for kind in ("input_activations", "output_activations"):
                a = getattr(g, kind)
                if a is not None:
                    out.append(f"config group {key!r}: {kind.replace('_', ' ')} "
                               f"{a.describe()}")
        if self.kv_cache_scheme is not None:
            out.append(f"kv_cache_scheme {self.kv_cache_scheme.describe()}")
        return out

    def args_for(self, name: str, module: Any, *, in_block: bool = True,
                 groups: dict[str, QuantizationScheme] | None = None
                 ) -> QuantizationArgs | None:
        """The weight arguments for module ``name``, or None (see :meth:`scheme_for`)."""
        s = self.scheme_for(name, module, in_block=in_block, groups=groups)
        return None if s is None else s.weights

    def scheme_for(self, name: str, module: Any, *, in_block: bool = True,
                   groups: dict[str, QuantizationScheme] | None = None
                   ) -> QuantizationScheme | None:
        """The scheme for module ``name``, or None if it is not to be quantized.
        ``in_block=False`` (a module outside the decoder blocks) only matches by full name or
        regex, never by class name."""
        if any(match_target(name, module, t) for t in self.ignore):
            return None
        groups = self.resolved_groups() if groups is None else groups
        best: tuple[int, str, QuantizationScheme] | None = None
        for key, g in groups.items():
            spec = max((match_specificity(name, module, t) for t in g.targets), default=0)
            if spec == 0 or (not in_block and spec < 2):
                continue
            if best is None or spec > best[0]:
                best = (spec, key, g)
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
        elif isinstance(self.scheme, dict):
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
