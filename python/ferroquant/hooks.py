"""One registry for everything calibration puts on a model: forward hooks, pre-hooks and
replaced ``forward`` methods. Whatever happens - a finished pass or an exception half-way
through a block - :meth:`HookRegistry.close` leaves the model as it was found."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookRegistry", "StopForward"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass whose remaining work nobody needs (the last
    target of a pass has seen its input, or block inputs are recorded up to the last block).
    It is the only exception a hook sends through model code; everything else a hook learns
    is kept as state and read after the pass."""


class HookRegistry:
    """Owns hook handles and ``forward`` replacements, grouped by a key so one pass can drop its
    own hooks (:meth:`remove`) while :meth:`close` drops everything still registered."""

    def __init__(self) -> None:
        self._handles: dict[str, list[RemovableHandle]] = {}
        # module -> (the instance's own forward attribute or None, whether it had one)
        self._forwards: dict[str, list[tuple[nn.Module, Any, bool]]] = {}

    def pre(self, key: str, module: nn.Module, fn: Callable[..., Any], *,
            prepend: bool = False, with_kwargs: bool = False) -> None:
        """A forward pre-hook; ``prepend`` runs it before the module's other pre-hooks (a
        calibration hook sees the input before the module's own input quantization does)."""
        self._handles.setdefault(key, []).append(
            module.register_forward_pre_hook(fn, prepend=prepend, with_kwargs=with_kwargs))

    def post(self, key: str, module: nn.Module, fn: Callable[..., Any]) -> None:
        self._handles.setdefault(key, []).append(module.register_forward_hook(fn))

    def replace_forward(self, key: str, module: nn.Module, fn: Callable[..., Any]) -> None:
        """Replaces ``module.forward`` (the instance attribute) until the group is removed."""
        had = "forward" in module.__dict__
        self._forwards.setdefault(key, []).append((module, module.__dict__.get("forward"), had))
        module.forward = fn

    def remove(self, key: str) -> None:
        for h in self._handles.pop(key, []):
            h.remove()
        for module, fwd, had in reversed(self._forwards.pop(key, [])):
            if had:
                module.forward = fwd
            else:
                module.__dict__.pop("forward", None)

    def close(self) -> None:
        for key in list(self._handles) + list(self._forwards):
            self.remove(key)

    def __len__(self) -> int:
        return sum(map(len, self._handles.values())) + sum(map(len, self._forwards.values()))

    def __enter__(self) -> HookRegistry:  # noqa: PYI034 - a final class
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
