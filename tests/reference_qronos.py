"""An independent float64 re-implementation of Qronos (Zhang et al., ICLR 2026) as the paper
and its reference code (Brevitas ``graph/qronos.py``) order the steps: the first column refitted
against the float output with the others unchanged and quantized; every later column refitted
in closed form given the quantized first; then GPTQ's column loop (unbatched) on the rest.

Written from the equations, not from ferroquant's shortcut (GPTQ started from a precomputed
refit), so agreement checks that shortcut too. The ridge is ferroquant's choice, GPTQ's own
damping ``percdamp * mean(diag H)`` (Brevitas: ``1e-6 * lambda_max``); grids are fitted on the
state a group has when it starts, the first group's (and a per-channel grid) on the refit made
before the first column is quantized.
"""

from __future__ import annotations

import torch
from reference_gptq import GridSpec, codes_of, find_params, quantize


def stats(x: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = (2/T) X~ᵀX~`` and ``G = (2/T) XᵀX~`` (row: float feature) from token rows
    ``[T, n]``, in float64."""
    x, xq = x.double(), xq.double()
    f = 2.0 / x.shape[0]
    return f * xq.T @ xq, f * x.T @ xq


def qronos_reference(
    weight: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    spec: GridSpec,
    *,
    group_size: int = -1,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dequantized, codes, ties): ``[rows, cols]`` in the original column order, and
    per row whether a column sat within 1e-6 of a rounding tie (the symmetric grid puts a
    group's extreme exactly on one: float32 arithmetic may round it either way, and the row's
    later columns follow)."""
    w_orig = weight.double()
    h = h.double().clone()
    g = g.double()
    rows, n = w_orig.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # the GPTQ reference's convention
    w = w_orig.clone()
    w[:, dead] = 0
    order = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
             else torch.arange(n))
    damp = percdamp * torch.mean(torch.diag(h))
    wp, wo = w[:, order], w_orig[:, order]
    hp, gp = h[order][:, order], g[order][:, order]
    assert not dead[order[0]], "the reference starts on a live column"
    hd = hp + damp * torch.eye(n, dtype=torch.float64)
    live = [p for p in range(1, n) if not dead[order[p]]]

    # step 1: the first column against the float output, the others as they are
    v0 = (wo @ gp[:, 0] - wp[:, 1:] @ hp[1:, 0]) / hp[0, 0]

    def refit(a0: torch.Tensor) -> torch.Tensor:
        """The live later columns by least squares against the float output given column 0 =
        ``a0`` (ridge ``damp`` towards the float weights)."""
        rhs = wo @ (gp + damp * torch.eye(n, dtype=torch.float64))[:, live] - a0[:, None] * hp[0, live]
        return torch.linalg.solve(hd[live][:, live], rhs.T).T

    cur = wp.clone()
    cur[:, 0] = v0
    cur[:, live] = refit(v0)

    # grids: per channel on that state, static groups on its natural groups
    grid: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if group_size == -1:
        whole = find_params(cur, spec)
    elif static_groups:
        natural = torch.empty_like(cur)
        natural[:, order] = cur
        for s in range(0, n, group_size):
            grid[s // group_size] = find_params(natural[:, s:s + group_size], spec)

    def params(p: int) -> tuple[torch.Tensor, torch.Tensor]:
        if group_size == -1:
            return whole
        if static_groups:
            return grid[int(order[p]) // group_size]
        if p % group_size == 0:  # a group starts: fitted on its current state
            grid[p // group_size] = find_params(cur[:, p:p + group_size], spec)
        return grid[p // group_size]

    q_all = torch.zeros_like(cur)
    codes = torch.zeros_like(cur)
    ties = torch.zeros(rows, dtype=torch.bool)

    def near_tie(col: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        r = (col / sc).flatten()
        return ((r - torch.floor(r)) - 0.5).abs() < 1e-6

    s0, z0 = params(0)
    ties |= near_tie(cur[:, :1], s0)
    q_all[:, 0] = quantize(cur[:, :1], s0, z0, spec.maxq).flatten()
    codes[:, 0] = codes_of(cur[:, :1], s0, z0, spec.maxq).flatten()
    # step 2: the rest refitted given the quantized first column
    cur[:, 0] = q_all[:, 0]
    cur[:, live] = refit(q_all[:, 0])

    # step 3: GPTQ's column loop on positions 1.. with the damped H of those positions
    hinv = torch.linalg.cholesky(torch.linalg.inv(hd[1:, 1:]), upper=True)
    for p in range(1, n):
        sc, ze = params(p)
        col = cur[:, p:p + 1]
        ties |= near_tie(col, sc)
        q = quantize(col, sc, ze, spec.maxq).flatten()
        q_all[:, p] = q
        codes[:, p] = codes_of(col, sc, ze, spec.maxq).flatten()
        e = (cur[:, p] - q) / hinv[p - 1, p - 1]
        cur[:, p:] -= e[:, None] * hinv[p - 1, p - 1:][None, :]
    inv = torch.argsort(order)
    return q_all[:, inv], codes[:, inv], ties


def output_error(weight: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
                 xq: torch.Tensor) -> float:
    """``||W X - Q X~||²`` over the tokens (rows of ``x``/``xq``), float64: the error against the
    float model's output that Qronos and GPTAQ minimise."""
    return float(((x.double() @ weight.double().T - xq.double() @ q.double().T) ** 2).sum())
