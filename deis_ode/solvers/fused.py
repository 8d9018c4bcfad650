r"""Fused multistep updates: the history of ``N`` and the state in one buffer, three tensor operations per step.

A main update of a multistep plan is ``x_{n+1} = a x_n + sum_j C_j N_{n-j}`` with at most K nodes. Keep the last K
values of ``N`` in rows ``0 .. K-1`` of one buffer ``H`` (``N_i`` in row ``i mod K``) and ``x_n`` in row ``K``. Then

    H[i mod K] <- N_n                                       (one copy)
    H[K]       <- sum_r S_n[r] H[r]                         (one product, one sum over the leading dimension)

with the coefficient stack ``S_n[i mod K] = C_j`` for the node ``i = n - j``, ``S_n[K] = a``, and zero in the rows of
unused nodes. That is three operations per step whatever K (the unfused update takes 1 + K), none of which allocates;
on small states, where each operation costs a few microseconds of dispatch whatever its size, this is most of the
step. A stack depends on the coefficients and on the rotation ``n mod K`` only, so a uniform grid needs at most K
distinct stacks; they are built once, on the state's device and dtype, before the loop.

Finiteness of ``N`` is checked K evaluations at a time: whenever the rows ``0 .. K-1`` hold K new values, their sums go
into a device buffer (in float64 or complex128, so that a float32 state cannot overflow the sum; for a float64 state
only a sum beyond 1.8e308 in magnitude would be reported as non-finite), which is read once after the loop.

The buffer is written in place, so this path serves solves that autograd does not track; the engine
(:func:`deis_ode.solvers.multistep.run_plan`) decides. ``N`` receives a copy of the state row (one more small
operation per step), so a nonlinear part may keep its input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .multistep import Update


def exact_dtype(x: Tensor) -> torch.dtype:
    """The dtype of finiteness sums of tensors like ``x``: float64 or complex128 (the state's own where the device
    has no float64)."""
    if x.device.type == "mps":
        return x.dtype
    return torch.complex128 if x.is_complex() else torch.float64


def _base_stack(update: Update, like: Tensor) -> Tensor:
    """``[C_0, .., C_{k-1}, a, 0]`` of ``update`` (placed) as one tensor on ``like``'s device and dtype, shaped to
    broadcast against ``like`` after its leading dimension."""
    values = [*update.weights, update.transition, 0.0]
    if not any(isinstance(v, Tensor) for v in values):
        exact = torch.complex128 if any(isinstance(v, complex) for v in values) else torch.float64
        base = torch.tensor(values, dtype=exact).to(device=like.device, dtype=like.dtype)
        return base.reshape(len(values), *([1] * like.dim()))
    shape = max((v.shape for v in values if isinstance(v, Tensor)), key=len)  # one shape, or 0-dim
    full = [
        v.expand(shape) if isinstance(v, Tensor) else torch.full(shape, v, device=like.device, dtype=like.dtype)
        for v in values
    ]
    base = torch.stack(full).to(like.dtype)  # complex * complex is the faster product for a complex state
    return base.reshape(len(values), *([1] * (like.dim() - len(shape))), *shape)


def coefficient_stacks(updates: list[Update], order: int, like: Tensor) -> list[Tensor]:
    """The stack ``S_n`` of each update, shaped to broadcast against the buffer ``(order + 1, *like.shape)``.

    Updates that share their coefficient list (a plan gives updates of identical geometry one list) share one
    stacked copy of their coefficients, and each rotation ``n mod K`` of it is one indexing operation."""
    bases: dict[int, Tensor] = {}
    built: dict[tuple[int, int], Tensor] = {}
    out = []
    for update in updates:
        key = (update.source % order, id(update.weights))
        stack = built.get(key)
        if stack is None:
            base = bases.get(key[1])
            if base is None:
                base = bases[key[1]] = _base_stack(update, like)
            k = len(update.nodes)
            index = [k + 1] * (order + 1)  # the zero row, for rows of unused nodes
            for j, node in enumerate(update.nodes):
                index[node % order] = j
            index[order] = k
            stack = built[key] = base[index]
        out.append(stack)
    return out


def run_fused(
    updates: list[Update],
    order: int,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    history: dict[int, Tensor],
    grid: list[Tensor],
    wanted: set[int],
    on_step: Callable[[int, Tensor], None] | None = None,
    shift: list[float] | None = None,
) -> tuple[dict[int, Tensor], FusedCheck]:
    """Run the main ``updates`` (consecutive steps ``n -> n + 1``) from ``x = x_n`` of the first one.

    Args:
        history: ``N_i`` for the nodes before the first update's source, and for that source itself (already
            evaluated and checked by the caller); only the last ``order`` are used.
        grid: the grid times as 0-dim tensors on the state's device in the state's real dtype (what ``nonlinear``
            receives).
        wanted: the grid indices whose states are returned.
        on_step: called as ``on_step(n, x_n)`` before step ``n``.
        shift: as for :func:`~deis_ode.solvers.multistep.run_plan`: the row of ``N_n`` receives
            ``nonlinear(t_n, x_n) + shift[n] x_n``.

    ``nonlinear`` and ``on_step`` receive a copy of the state (the buffer row is overwritten by the next step).

    Returns:
        The states at the ``wanted`` indices reached by the loop (the final state among them when it is wanted),
        and its finiteness sums (:class:`FusedCheck`; nothing is read on the host here).
    """
    stacks = coefficient_stacks(updates, order, x)
    buffer = torch.zeros((order + 1, *x.shape), dtype=x.dtype, device=x.device)
    rows = buffer.unbind(0)
    for i, value in history.items():
        if i > updates[0].source - order:
            rows[i % order].copy_(value)
    state = rows[order]
    state.copy_(x)
    scratch = torch.empty_like(buffer)
    values = buffer[:order].reshape(order, -1)
    exact = exact_dtype(x)
    checks = torch.zeros((len(updates) // order + 2, order), dtype=exact, device=x.device)
    check_rows = checks.unbind(0)
    checked_at: list[int] = []
    results: dict[int, Tensor] = {}
    shape = x.shape

    def check(n: int) -> None:
        torch.sum(values, dim=1, dtype=exact, out=check_rows[len(checked_at)])
        checked_at.append(n)

    for k, (update, stack) in enumerate(zip(updates, stacks, strict=True)):
        n = update.source
        if k > 0:
            current = state.clone()  # what the user's code sees is never overwritten
            if on_step is not None:
                on_step(n, current)
            out = nonlinear(grid[n], current)
            if out.shape != shape:
                raise ValueError(
                    f"N(t, x) returned shape {tuple(out.shape)}; expected the state's shape {tuple(shape)}"
                )
            if shift is not None and shift[n] != 0.0:
                torch.add(out, current, alpha=shift[n], out=rows[n % order])
            else:
                rows[n % order].copy_(out)
        if n % order == order - 1:
            check(n)
        torch.sum(torch.mul(stack, buffer, out=scratch), dim=0, out=state)
        if update.target in wanted:
            results[update.target] = state.clone()
    check(updates[-1].source)

    return results, FusedCheck(checks[: len(checked_at)], checked_at, order)


class FusedCheck:
    """The finiteness sums of a fused loop: :meth:`all_finite` stays on the device (the caller combines it with its
    own flags into one synchronisation); :meth:`first_bad` locates the first non-finite evaluation (error path)."""

    def __init__(self, sums: Tensor, checked_at: list[int], order: int) -> None:
        self.sums, self.checked_at, self.order = sums, checked_at, order

    def all_finite(self) -> Tensor:
        """A device boolean: every checked sum is finite."""
        return torch.isfinite(self.sums).all()

    def first_bad(self) -> int | None:
        """The grid index of the first evaluation of ``N`` in the loop that was not finite, or ``None``."""
        flags = torch.isfinite(self.sums)
        if bool(flags.all()):
            return None
        # a check after evaluating N_n saw in row r the newest grid index <= n congruent to r; rows of indices
        # before the loop held values the caller had checked (or zeros), so the smallest bad index is the first
        order = self.order
        return min(self.checked_at[c] - (self.checked_at[c] - r) % order for c, r in torch.nonzero(~flags).tolist())
