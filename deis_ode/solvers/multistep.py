r"""The exponential Adams-Bashforth engine: deisK, K = 1..5, on any grid.

On a grid ``t_0, ..., t_M`` the K-node method is

    x_{n+1} = Phi(t_{n+1}, t_n) x_n + sum_{j<K} C_{n,j} N_{n-j},     N_i = N(t_i, x_i),

with ``C_{n,j}`` from :func:`deis_ode.solvers.coefficients.step_coefficients`. Its global order is K.

Warm-up (the first K-1 steps lack K past values of N):

* ``"lower_order"``: step ``n`` uses ``min(K, n+1)`` nodes. No extra evaluations, but the first
  (exponential Euler) step leaves an O(h^2) error, so the global order is ``min(K, 2)`` on uniform grids.
* ``"full_order"``: the first ``B = K-1`` steps are solved as one block. A lower-order pass gives a first
  guess of ``x_1..x_B`` with an O(h^2) error; then ``K-1`` Picard sweeps re-evaluate ``N_1..N_B`` and recompute
  each block step with the polynomial *interpolating* all K nodes ``t_0..t_B`` (exponential collocation). Each
  sweep gains one power of h, so the starting values carry an O(h^{K+1}) error, one power of h below the
  method's global error, at ``(K-1)^2`` extra evaluations of N (1, 4, 9, 16 for deis2 .. deis5). ``K-2`` sweeps
  would keep the global order K (a zero-stable method carries an O(h^K) starting error along without amplifying
  it), but the starting error can then dominate: tried in ``benchmarks/stiff.py``, deis4's final error on
  Gray-Scott grew 7-13x (at 100 and 200 steps) for 3 evaluations saved, so the start keeps its last sweep.
  With N independent of x and a polynomial of degree < K in the basis variable the whole solve is exact.

``lower_order_final`` lowers the order of the last steps symmetrically: step ``n`` uses at most ``M - n``
nodes (diffusers' choice for few-step sampling).

The plan (which values each step combines, with which float64 coefficients) is built once per grid, all
distinct step geometries together where L is constant. The loop applies it on the state's device and dtype:
where autograd does not track the solve, the main steps run fused (:mod:`deis_ode.solvers.fused`: the history of
``N`` and the state in one buffer, three tensor operations per step); otherwise one linear combination per step.
Finiteness of ``N`` is recorded on the device (as sums) and checked once at the end, so the loop never waits on
the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..forms import ExponentialForm, LinearForm
from .coefficients import batched_weights_from_phi, step_coefficients
from .fused import finiteness_sum, run_fused
from .phi import phi_functions_host

F64 = torch.float64
WARMUPS = ("lower_order", "full_order")


@dataclass
class Update:
    """``x[target] = transition * x[source] + sum_j weights[j] * N[nodes[j]]``.

    Updates of one plan that share their ``weights`` list object share their transition and their node offsets
    too (:func:`build_plan` gives updates of identical geometry one list); placement and the fused loop's stacks
    rely on it.
    """

    source: int
    target: int
    nodes: tuple[int, ...]
    transition: object  # float64 tensor while planning; Python number or state-dtype tensor once placed
    weights: list
    matrix: bool = False  # transition and weights are (d, d) matrices acting on the last dimension


@dataclass
class Plan:
    """Everything the loop needs, computed once per grid.

    ``start`` (possibly empty) are the lower-order guesses of the warm-up block, ``block`` its collocation
    updates repeated ``sweeps`` times, ``main`` the multistep updates.
    """

    order: int
    start: list[Update] = field(default_factory=list)
    block: list[Update] = field(default_factory=list)
    sweeps: int = 0
    main: list[Update] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        """Number of evaluations of N the loop performs."""
        return len(self.start) + self.sweeps * len(self.block) + len(self.main)


def _rounded_steps(grid: np.ndarray) -> tuple[float, ...]:
    """The steps of ``grid`` with their binary mantissas rounded to 12 decimals (about 12 significant digits), as
    cache keys."""
    mantissa, exponent = np.frexp(np.diff(grid))
    return tuple(np.ldexp(np.round(mantissa, 12), exponent).tolist())


Spec = tuple[int, int, tuple[int, ...]]  # (source, target, nodes) of one update


class _CoefficientCache:
    """Computes the coefficients of many updates at once.

    When they depend on nothing but the step's geometry (constant diagonal L, W = 1, basis t), updates of identical
    geometry share one computation, and all distinct geometries are computed together on the host in numpy: one
    evaluation of the phi-functions for all of them, then one batched product per number of nodes. A uniform grid
    costs a few dozen array operations whatever its length. Otherwise each update is computed by
    :func:`~deis_ode.solvers.coefficients.step_coefficients`.
    """

    def __init__(self, form: ExponentialForm, basis: str) -> None:
        self.form, self.basis = form, basis
        lin = form.constant_linear if isinstance(form, LinearForm) else None
        self.enabled = (
            isinstance(form, LinearForm)
            and lin is not None
            and not form.matrix
            and form.weight_fn is None
            and basis == "t"
            and not lin.requires_grad
        )

    def __call__(self, times: Tensor, specs: list[Spec]) -> list[tuple[Tensor, list[Tensor]]]:
        """``(transition, weights)`` of each update ``(source, target, nodes)`` on the float64 grid ``times``."""
        if not self.enabled:
            out = []
            for source, target, nodes in specs:
                transition, weights = step_coefficients(
                    self.form, self.basis, times[source], times[target], times[list(nodes)]
                )
                out.append((transition, list(weights.unbind(0))))
            return out
        grid = times.tolist()
        # An update's geometry is the sizes of the intervals it spans, each to 12 significant digits: steps of a
        # linspace grid that differ only by round-off share one entry; the reused coefficients belong to a grid
        # moved by about 1e-12 of a step, far below any truncation error.
        intervals = _rounded_steps(times.numpy())
        keys, first = [], {}
        for spec in specs:
            source, target, nodes = spec  # nodes: a contiguous range of indices, in either order
            lo = min(source, target, nodes[0], nodes[-1])
            hi = max(source, target, nodes[0], nodes[-1])
            key = (intervals[lo:hi], source - lo, target - lo, nodes[0] - lo, nodes[-1] - lo)
            keys.append(key)
            first.setdefault(key, spec)
        lin = self.form.constant_linear.detach().to(device="cpu")
        lin = lin.to(torch.complex128 if lin.is_complex() else F64).numpy()
        # the phi-functions of every distinct geometry's z = L h in one evaluation, then the weights of all
        # geometries with the same number of nodes in one batched product (in numpy: host work without autograd)
        distinct = list(first.items())
        hs = np.array([grid[target] - grid[source] for _, (source, target, _) in distinct])
        kmax = max(len(nodes) for _, (_, _, nodes) in distinct)
        phis = phi_functions_host(hs.reshape(-1, *([1] * lin.ndim)) * lin, kmax)  # (kmax + 1, geometries, *L)
        transitions = torch.from_numpy(phis[0]).unbind(0)
        table = {}
        for k in {len(nodes) for _, (_, _, nodes) in distinct}:
            members = [i for i, (_, (_, _, nodes)) in enumerate(distinct) if len(nodes) == k]
            theta = []
            for i in members:
                source, _, nodes = distinct[i][1]
                theta.append([(grid[n] - grid[source]) / hs[i] for n in nodes])
            weights = torch.from_numpy(batched_weights_from_phi(phis[1 : k + 1, members], hs[members], theta))
            for i, w in zip(members, weights.unbind(0), strict=True):
                table[distinct[i][0]] = (transitions[i], list(w.unbind(0)))
        return [table[key] for key in keys]


def full_order_sweeps(order: int) -> int:
    """Picard sweeps of the full-order warm-up of the ``order``-node method: ``K - 1``."""
    return order - 1


def build_plan(
    form: ExponentialForm,
    basis: str,
    times: Tensor,
    order: int,
    warmup: str = "lower_order",
    lower_order_final: bool = False,
) -> Plan:
    """The update plan of the ``order``-node method on the float64 grid ``times`` (strictly monotone).

    Raises:
        ValueError: unknown warm-up, or a full-order warm-up on a grid with fewer than ``order - 1`` steps.
    """
    if warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
    steps = times.numel() - 1
    start: list[Spec] = []
    block: list[Spec] = []
    main: list[Spec] = []
    first = 0
    if warmup == "full_order" and order > 1:
        size = order - 1
        if steps < size:
            raise ValueError(
                f"warmup='full_order' for a {order}-node method needs at least {size} steps, the grid has {steps}: "
                "use more steps, a lower order, or warmup='lower_order'"
            )
        block_nodes = tuple(range(order))
        for n in range(size):
            start.append((n, n + 1, tuple(range(n, -1, -1))))
            block.append((n, n + 1, block_nodes))
        first = size
    for n in range(first, steps):
        k = min(order, n + 1) if first == 0 else order
        if lower_order_final:
            k = min(k, steps - n)
        main.append((n, n + 1, tuple(range(n, n - k, -1))))
    specs = start + block + main
    matrix = bool(getattr(form, "matrix", False))
    updates = [
        Update(source, target, nodes, transition, weights, matrix)
        for (source, target, nodes), (transition, weights) in zip(
            specs, _CoefficientCache(form, basis)(times, specs), strict=True
        )
    ]
    return Plan(
        order=order,
        start=updates[: len(start)],
        block=updates[len(start) : len(start) + len(block)],
        sweeps=full_order_sweeps(order) if block else 0,
        main=updates[len(start) + len(block) :],
    )


def _place(value: Tensor, like: Tensor):
    """A float64 coefficient on the state's device and dtype (a Python number when it is a plain scalar,
    which costs no kernel and no transfer)."""
    if value.is_complex() and not like.is_complex():
        if bool((value.imag != 0).any()):
            raise ValueError(
                "the linear part is complex but the state is real: the solution would be complex; "
                "pass a complex initial state"
            )
        value = value.real
    if value.dim() == 0 and not value.requires_grad:
        return value.item()
    if like.is_complex() and not value.is_complex():
        # real coefficients of a complex state stay real in the state's precision (no conversion when they already
        # are: complex * real keeps the complex dtype)
        return value.to(device=like.device, dtype=like.real.dtype)
    return value.to(device=like.device, dtype=like.dtype)


def place_updates(updates: Iterable[Update], like: Tensor) -> None:
    """Move the coefficients of ``updates`` to the device and dtype of the state ``like`` (in place); updates that
    share a cached coefficient share one placed copy."""
    placed: dict[int, object] = {}
    lists: dict[int, tuple[object, list, list]] = {}

    def place(value: Tensor):
        key = id(value)
        if key not in placed:
            placed[key] = (_place(value, like), value)  # keep value alive so that its id stays unique
        return placed[key][0]

    for update in updates:
        key = id(update.weights)
        if key not in lists:  # updates that shared a list of coefficients (and a transition) share the placed ones
            lists[key] = (place(update.transition), [place(w) for w in update.weights], update.weights)
        update.transition, update.weights = lists[key][0], lists[key][1]


def place_plan(plan: Plan, like: Tensor) -> Plan:
    """Move every coefficient of ``plan`` to the device and dtype of the state ``like`` (in place)."""
    place_updates(plan.start + plan.block + plan.main, like)
    return plan


def first_non_finite(sums: list[Tensor]) -> int | None:
    """The index of the first non-finite entry among per-evaluation finiteness sums (device scalars from
    :func:`~deis_ode.solvers.fused.finiteness_sum`), or ``None``: one host synchronisation, after the loop."""
    if not sums:
        return None
    finite = torch.isfinite(torch.stack(sums))
    if bool(finite.all()):
        return None
    return int(torch.nonzero(~finite)[0, 0])


def apply_update(update: Update, x: Tensor, values: dict[int, Tensor]) -> Tensor:
    """``transition * x + sum_j weights[j] * values[nodes[j]]``: one step of a plan, fused where autograd allows."""
    a = update.transition
    if update.matrix:
        out = x @ a.T
        for w, node in zip(update.weights, update.nodes, strict=True):
            out = out + values[node] @ w.T
        return out
    out = x * a
    for w, node in zip(update.weights, update.nodes, strict=True):
        if isinstance(w, Tensor):
            out = out.addcmul_(w, values[node]) if not out.requires_grad else out + w * values[node]
        else:
            out = out.add_(values[node], alpha=w) if not out.requires_grad else out.add(values[node], alpha=w)
    return out


#: Largest state (in elements) whose main steps run fused. The fused step makes three tensor operations instead of
#: 1 + K, but makes more passes over state-sized arrays: on small states, where each operation costs microseconds of
#: dispatch whatever its size, it is up to 2.2x faster; around 8k elements the two break even, and at 64k elements
#: the fused step is 1.4-1.5x slower (``python benchmarks/fused_step.py``, K = 4, one CPU thread).
FUSED_MAX_ELEMENTS = 8192


def _fusable(updates: list[Update], x: Tensor, value: Tensor) -> bool:
    """Whether the main ``updates`` run fused (:mod:`deis_ode.solvers.fused`, in-place buffers): a state of at most
    :data:`FUSED_MAX_ELEMENTS` elements, diagonal or scalar coefficients, and nothing that autograd tracks (``value``
    is the first evaluation of N)."""
    if x.numel() > FUSED_MAX_ELEMENTS or any(u.matrix for u in updates):
        return False
    if not torch.is_grad_enabled():
        return True
    if x.requires_grad or value.requires_grad:
        return False
    distinct = {id(u.weights): u for u in updates}.values()
    return not any(isinstance(c, Tensor) and c.requires_grad for u in distinct for c in (u.transition, *u.weights))


def run_plan(
    plan: Plan,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    times: Tensor,
    outputs: list[int],
    on_step: Callable[[int, Tensor], None] | None = None,
    noise: Callable[[Update], Tensor | None] | None = None,
) -> list[Tensor]:
    """Execute ``plan`` from ``x0`` and return the states at the grid indices ``outputs`` (increasing).

    Args:
        nonlinear: ``(t, x) -> N(t, x)``; ``t`` is a 0-dim tensor of the state's real dtype.
        times: the grid on the state's device in the state's real dtype (what ``nonlinear`` receives).
        on_step: called as ``on_step(n, x_n)`` once per grid step, with the final ``x_n``.
        noise: for stochastic methods (:mod:`deis_ode.solvers.stochastic`): ``noise(update)`` is added to the state
            after each main update (``None`` adds nothing). Plans with a warm-up block are not supported.

    Raises:
        FloatingPointError: if N returned NaN or inf; names the first step and time where it did.
    """
    if noise is not None and plan.block:
        raise ValueError("run_plan: noise needs a plan without a warm-up block (warmup='lower_order')")
    values: dict[int, Tensor] = {}
    finite: list[Tensor] = []
    where: list[int] = []

    def evaluate(i: int, x: Tensor) -> None:
        out = nonlinear(times[i], x)
        values[i] = out
        finite.append(finiteness_sum(out))
        where.append(i)

    states: dict[int, Tensor] = {0: x0}
    wanted = set(outputs)
    results: dict[int, Tensor] = {}

    def keep(i: int, x: Tensor) -> None:
        if i in wanted:
            results[i] = x

    keep(0, x0)
    if plan.block:
        for update in plan.start:
            evaluate(update.source, states[update.source])
            states[update.target] = apply_update(update, states[update.source], values)
        for _ in range(plan.sweeps):
            for update in plan.block:
                evaluate(update.target, states[update.target])
            for update in plan.block:
                states[update.target] = apply_update(update, states[update.source], values)
        for update in plan.block:
            if on_step is not None:
                on_step(update.source, states[update.source])
            keep(update.target, states[update.target])
    x = states[max(states)]
    main = plan.main
    fused_check = None
    if main:
        if on_step is not None:
            on_step(main[0].source, x)
        evaluate(main[0].source, x)
        if noise is None and _fusable(main, x, values[main[0].source]):
            reached, fused_check = run_fused(main, plan.order, nonlinear, x, values, times, wanted, on_step)
            results.update(reached)
            main = []
    for k, update in enumerate(main):
        if k > 0:
            if on_step is not None:
                on_step(update.source, x)
            evaluate(update.source, x)
        x = apply_update(update, x, values)
        if noise is not None:
            increment = noise(update)
            if increment is not None:
                x = x + increment
        keep(update.target, x)
        for stale in [i for i in values if i <= update.target - plan.order]:
            del values[stale]

    checks = [torch.isfinite(torch.stack(finite)).all()] if finite else []
    if fused_check is not None:
        checks.append(fused_check.all_finite())
    if checks and not bool(torch.stack(checks).all()):  # the loop's single host synchronisation
        first = first_non_finite(finite)
        i = where[first] if first is not None else fused_check.first_bad()
        raise FloatingPointError(
            f"the nonlinear part N(t, x) returned NaN or inf at grid step {i} (t = {times[i].item():.8g}); "
            "the model or the state diverged there"
        )
    return [results[i] for i in outputs]
