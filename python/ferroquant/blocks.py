"""Finding the decoder blocks of a causal LM and the quantizable modules inside them.

Discovery is generic: the blocks are the ``nn.ModuleList`` whose entries all have one class and
which holds the most parameters (``model.layers`` for Llama-likes, ``transformer.h`` for GPT-2,
``model.decoder.layers`` for OPT). ``sequential_targets`` in the recipe overrides it with a dotted
path to a ``ModuleList`` or a block class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockDiscoveryError", "Blocks", "find_blocks", "is_quantizable", "linear_weight"]


class BlockDiscoveryError(ValueError):
    """The decoder blocks could not be found; the message says what was found and what to pass."""


@dataclass
class Blocks:
    path: str  # dotted path of the ModuleList, or "<class Name>" when chosen by class
    names: list[str]  # full dotted name of every block
    modules: list[nn.Module]

    def __len__(self) -> int:
        return len(self.modules)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers missing or moved: fall back to the class name
        return None


_CONV1D = _conv1d_type()


def _is_conv1d(m: nn.Module) -> bool:
    if _CONV1D is not None and isinstance(m, _CONV1D):
        return True
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None \
        and getattr(m, "nf", None) is not None


def is_quantizable(m: nn.Module) -> bool:
    """A linear layer GPTQ can quantize: ``nn.Linear`` (and subclasses) or transformers'
    ``Conv1D``."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def linear_weight(m: nn.Module) -> tuple[torch.Tensor, bool]:
    """The weight in ``nn.Linear`` orientation ``[out, in]`` (a view) and whether it is a
    transposed ``Conv1D`` weight."""
    if _is_conv1d(m):
        return m.weight.data.t(), True
    return m.weight.data, False


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        types = {type(c) for c in mod}
        if len(types) != 1:
            continue
        child = mod[0]
        if is_quantizable(child) or not any(is_quantizable(m) for m in child.modules()):
            continue  # a list of bare Linears or of modules with nothing to quantize
        out.append((name, mod, _n_params(mod)))
    return out


def _describe(model: nn.Module) -> str:
    lists = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            kinds = sorted({type(c).__name__ for c in mod})
            lists.append(f"{name or '<root>'} ({len(mod)} x {'/'.join(kinds)})")
    no_split = getattr(model, "_no_split_modules", None)
    parts = [f"model class {type(model).__name__}"]
    parts.append("ModuleLists found: " + (", ".join(lists[:8]) if lists else "none"))
    if no_split:
        parts.append(f"the model's _no_split_modules: {list(no_split)}")
    return "; ".join(parts)


def _hint() -> str:
    return ("pass the blocks explicitly, e.g. GPTQ(sequential_targets=['model.layers']) (a dotted "
            "path to the nn.ModuleList of decoder blocks) or "
            "GPTQ(sequential_targets=['LlamaDecoderLayer']) (the block class name)")


def _by_class(model: nn.Module, cls_name: str) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if type(mod).__name__ != cls_name:
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue  # nested inside a block already taken
        found.append((name, mod))
    return found


def find_blocks(model: nn.Module, sequential_targets: Sequence[str] | None = None) -> Blocks:
    """The decoder blocks, in execution order."""
    if sequential_targets:
        tried = []
        for t in sequential_targets:
            try:
                sub = model.get_submodule(t)
            except AttributeError:
                sub = None
            if isinstance(sub, nn.ModuleList) and len(sub):
                return Blocks(t, [f"{t}.{i}" for i in range(len(sub))], list(sub))
            if sub is not None:
                tried.append(f"{t!r} is a {type(sub).__name__}, not a non-empty nn.ModuleList")
                continue
            found = _by_class(model, t)
            if found:
                return Blocks(f"<class {t}>", [n for n, _ in found], [m for _, m in found])
            tried.append(f"{t!r} is neither a submodule path nor a module class in the model")
        raise BlockDiscoveryError(
            f"sequential_targets {list(sequential_targets)} found no blocks: "
            f"{'; '.join(tried)}. {_describe(model)}"
        )
    cands = _candidates(model)
    if not cands:
        raise BlockDiscoveryError(
            f"cannot find the decoder blocks (a non-empty nn.ModuleList of one block class "
            f"containing Linear layers). {_describe(model)}. {_hint()}"
        )
    name, mod, _ = max(cands, key=lambda c: (c[2], len(c[1])))
    return Blocks(name, [f"{name}.{i}" if name else str(i) for i in range(len(mod))], list(mod))
