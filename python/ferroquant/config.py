"""Recipes: schemes, config_groups, targets/ignore. OWNER: pipeline helper (extend freely,
keep QuantizationArgs' field names: they are the compressed-tensors ones)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


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
