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

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..forms import DiffusionForm, ExponentialForm, LinearForm
from .coefficients import batched_diffusion_coefficients, batched_weights_from_phi, step_coefficients
from .fused import run_fused
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
    transition: object  # float64 tensor or Python float while planning; Python number or state-dtype tensor once placed
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
    placed: dict = field(default_factory=dict, repr=False, compare=False)  # place_plan's copies per device and dtype

    def updates(self) -> list[Update]:
        """Every update: ``start``, ``block`` and ``main``."""
        return self.start + self.block + self.main

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


def constant_diagonal(form: ExponentialForm, basis: str) -> bool:
    """Whether the coefficients depend on nothing but each step's geometry: constant diagonal L, W = 1, basis t."""
    lin = form.constant_linear if isinstance(form, LinearForm) else None
    return (
        isinstance(form, LinearForm)
        and lin is not None
        and not form.matrix
        and form.weight_fn is None
        and basis == "t"
        and not lin.requires_grad
    )


def _per_step(form: ExponentialForm, basis: str, times: Tensor, spec: Spec) -> tuple[Tensor, list[Tensor]]:
    source, target, nodes = spec
    transition, weights = step_coefficients(form, basis, times[source], times[target], times[list(nodes)])
    return transition, list(weights.unbind(0))


def _geometry_coefficients(form: LinearForm, times: Tensor, specs: list[Spec]) -> list[tuple[Tensor, list[Tensor]]]:
    """Constant diagonal L: updates of identical geometry share one computation, and all distinct geometries are
    computed together on the host in numpy (one evaluation of the phi-functions, one batched product per number of
    nodes); a uniform grid costs a few dozen array operations whatever its length."""
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
    lin = form.constant_linear.detach().to(device="cpu")
    lin = lin.to(torch.complex128 if lin.is_complex() else F64).numpy()
    distinct = list(first.items())
    hs = np.array([grid[target] - grid[source] for _, (source, target, _) in distinct])
    kmax = max(len(nodes) for _, (_, _, nodes) in distinct)
    phis = phi_functions_host(hs.reshape(-1, *([1] * lin.ndim)) * lin, kmax)  # (kmax + 1, geometries, *L)
    if not np.isfinite(phis).all():
        bad = int(np.flatnonzero(~np.isfinite(phis).reshape(kmax + 1, len(distinct), -1).all(axis=(0, 2)))[0])
        _not_finite(times, *distinct[bad][1][:2])
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


def plan_coefficients(form: ExponentialForm, basis: str, times: Tensor, specs: list[Spec]) -> list[tuple]:
    """``(transition, weights)`` of each update ``(source, target, nodes)`` on the float64 grid ``times``.

    Three paths, all in float64 on the host: constant diagonal ``L`` with ``W = 1`` (geometries shared, numpy),
    diffusion forms (:func:`~deis_ode.solvers.coefficients.batched_diffusion_coefficients`: the schedule evaluated once
    per grid point, closed forms or one vectorised quadrature for all steps), and anything else one update at a time
    (:func:`~deis_ode.solvers.coefficients.step_coefficients`). Updates that share a coefficient list share the same
    Python object (placement and the fused stacks rely on it).
    """
    if constant_diagonal(form, basis):
        return _geometry_coefficients(form, times, specs)  # (checks its arrays for NaN and inf)
    if isinstance(form, DiffusionForm):
        out = batched_diffusion_coefficients(form, basis, times, specs)  # finite entries, or None
    else:
        out = [None] * len(specs)
    for i, spec in enumerate(specs):
        if out[i] is None:
            out[i] = _per_step(form, basis, times, spec)
            _check_finite(out[i], spec, times)
    return out


def full_order_sweeps(order: int) -> int:
    """Picard sweeps of the full-order warm-up of the ``order``-node method: ``K - 1``."""
    return order - 1


# --- the plan cache -------------------------------------------------------------------------------------------------

#: Largest total size, in bytes of float64 coefficients, of the plans kept by :func:`build_plan` for reuse.
PLAN_CACHE_BYTES = 256 * 2**20
#: Largest number of plans kept.
PLAN_CACHE_ENTRIES = 64
_PLAN_CACHE: OrderedDict[tuple, tuple[Plan, int, tuple]] = OrderedDict()


def _form_key(form: ExponentialForm) -> tuple[tuple, tuple] | None:
    """``(key, keep_alive)`` identifying the coefficients of ``form``, or ``None`` when they cannot be cached safely.

    A diffusion form is identified by its ``cache_key`` (the schedule's defining parameters, the split, the
    stochasticity and the time direction: :func:`deis_ode.diffusion.exponential_form`). A constant linear part is
    identified by the tensor itself and its version counter (an in-place change gives a new key); the tensor is kept
    alive with the entry, so its id cannot be reused. A callable ``L(t)`` or ``W(t)`` may hold state the cache cannot
    see, and a linear part that requires grad needs its autograd graph: those are never cached."""
    if isinstance(form, DiffusionForm):
        return None if form.cache_key is None else (("diffusion", form.cache_key), ())
    lin = form.constant_linear
    if lin is None or form.weight_fn is not None or form.linear_fn is not None or lin.requires_grad:
        return None
    return ("linear", id(lin), lin._version, lin.device.type, lin.dtype, form.matrix), (lin,)


def _plan_bytes(plan: Plan) -> int:
    seen, total = set(), 0
    for update in plan.updates():
        if id(update.weights) in seen:
            continue
        seen.add(id(update.weights))
        for value in (update.transition, *update.weights):
            total += value.numel() * value.element_size() if isinstance(value, Tensor) else 8
    return total


def clear_plan_cache() -> None:
    """Forget every cached plan (they are rebuilt on the next solve)."""
    _PLAN_CACHE.clear()


def build_plan(
    form: ExponentialForm,
    basis: str,
    times: Tensor,
    order: int,
    warmup: str = "lower_order",
    lower_order_final: bool = False,
    node_scale: np.ndarray | None = None,
) -> Plan:
    """The update plan of the ``order``-node method on the float64 grid ``times`` (strictly monotone).

    ``node_scale`` (one float64 per grid point) multiplies every weight applied to ``N`` at that point: the loop then
    stores ``N_i / node_scale[i]`` (a drift that returns a model output whose conversion to ``N`` is linear,
    ``N_i = c_i (y_i + r_i x_i)``, lets the conversion's factor ``c_i`` live in the coefficients).

    Plans are cached (bounded by :data:`PLAN_CACHE_BYTES` and :data:`PLAN_CACHE_ENTRIES`): a repeated solve on the
    same grid and form reuses its plan. A returned plan is shared; do not modify it.

    Raises:
        ValueError: unknown warm-up, a full-order warm-up on a grid with fewer than ``order - 1`` steps, or a linear
            part or weight that is not finite on the grid.
    """
    if warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {WARMUPS}, got {warmup!r}")
    times = times.detach().to(device="cpu", dtype=F64)
    form_key = _form_key(form)
    key = None
    if form_key is not None:
        scale_key = None if node_scale is None else np.asarray(node_scale, dtype=np.float64).tobytes()
        key = (form_key[0], basis, times.numpy().tobytes(), order, warmup, lower_order_final, scale_key)
        hit = _PLAN_CACHE.get(key)
        if hit is not None:
            _PLAN_CACHE.move_to_end(key)
            return hit[0]
    plan = _build_plan(form, basis, times, order, warmup, lower_order_final, node_scale)
    if key is not None:
        size = _plan_bytes(plan)
        if size <= PLAN_CACHE_BYTES // 4:
            _PLAN_CACHE[key] = (plan, size, form_key[1])
            while (
                sum(entry[1] for entry in _PLAN_CACHE.values()) > PLAN_CACHE_BYTES
                or len(_PLAN_CACHE) > PLAN_CACHE_ENTRIES
            ):
                _PLAN_CACHE.popitem(last=False)
    return plan


def _build_plan(form, basis, times, order, warmup, lower_order_final, node_scale) -> Plan:
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
    coefficients = plan_coefficients(form, basis, times, specs)
    if node_scale is not None:
        scale = np.asarray(node_scale, dtype=np.float64).tolist()
        folded = {}
        for i, ((transition, weights), (_, _, nodes)) in enumerate(zip(coefficients, specs, strict=True)):
            key = (id(weights), nodes)
            if key not in folded:
                folded[key] = (transition, [w * scale[node] for w, node in zip(weights, nodes, strict=True)])
            coefficients[i] = folded[key]
    updates = [
        Update(source, target, nodes, transition, weights, matrix)
        for (source, target, nodes), (transition, weights) in zip(specs, coefficients, strict=True)
    ]
    return Plan(
        order=order,
        start=updates[: len(start)],
        block=updates[len(start) : len(start) + len(block)],
        sweeps=full_order_sweeps(order) if block else 0,
        main=updates[len(start) + len(block) :],
    )


def _check_finite(coefficients: tuple, spec: Spec, times: Tensor) -> None:
    """``ValueError`` naming the step if the transition or a weight of one update is NaN or infinite (a linear part
    ``L`` or weight ``W`` with NaN or inf entries, or one that overflows over the step)."""
    transition, weights = coefficients
    for value in (transition, *weights):
        finite = math.isfinite(value) if isinstance(value, float) else bool(torch.isfinite(value.detach()).all())
        if not finite:
            _not_finite(times, spec[0], spec[1])


def _not_finite(times: Tensor, source: int, target: int) -> None:
    raise ValueError(
        f"the exponential coefficients of the step from t = {times[source].item():.8g} to "
        f"{times[target].item():.8g} are not finite: the linear part L (or the weight W) is NaN or infinite there, "
        "or exp(L h) overflows (a positive L over too long a step)"
    )


# --- placement ----------------------------------------------------------------------------------------------------


def place_coefficient(value, like: Tensor):
    """A float64 coefficient on the state's device and dtype (a Python number when it is a plain scalar,
    which costs no kernel and no transfer)."""
    if not isinstance(value, Tensor):
        if isinstance(value, complex) and not like.is_complex():
            if value.imag != 0:
                raise ValueError(
                    "the linear part is complex but the state is real: the solution would be complex; "
                    "pass a complex initial state"
                )
            return value.real
        return value
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


def place_updates(updates: Iterable[Update], like: Tensor) -> list[Update]:
    """Copies of ``updates`` with their coefficients on the device and dtype of the state ``like``; updates that
    share a coefficient list share one placed copy."""
    placed: dict[int, object] = {}
    lists: dict[int, tuple[object, list, list]] = {}

    def place(value):
        key = id(value)
        if key not in placed:
            placed[key] = (place_coefficient(value, like), value)  # keep value alive so that its id stays unique
        return placed[key][0]

    out = []
    for update in updates:
        key = id(update.weights)
        if key not in lists:  # updates that shared a list of coefficients (and a transition) share the placed ones
            lists[key] = (place(update.transition), [place(w) for w in update.weights], update.weights)
        out.append(Update(update.source, update.target, update.nodes, lists[key][0], lists[key][1], update.matrix))
    return out


def place_plan(plan: Plan, like: Tensor) -> Plan:
    """``plan`` with every coefficient on the device and dtype of the state ``like`` (a new plan; ``plan`` itself,
    which may be shared through the cache, is not changed). Placements are remembered per device and dtype."""
    key = (like.device, like.dtype)
    cached = plan.placed.get(key)
    if cached is not None:
        return cached
    updates = place_updates(plan.updates(), like)
    n_start, n_block = len(plan.start), len(plan.block)
    placed = Plan(
        order=plan.order,
        start=updates[:n_start],
        block=updates[n_start : n_start + n_block],
        sweeps=plan.sweeps,
        main=updates[n_start + n_block :],
    )
    if not any(isinstance(c, Tensor) and c.requires_grad for u in updates for c in (u.transition, *u.weights)):
        if len(plan.placed) >= 2:
            plan.placed.pop(next(iter(plan.placed)))
        plan.placed[key] = placed
    return placed


# --- the loop -------------------------------------------------------------------------------------------------------


def apply_update(update: Update, x: Tensor, values: dict[int, Tensor], dest: Tensor | None = None) -> Tensor:
    """``transition * x + sum_j weights[j] * values[nodes[j]]``: one step of a plan, in place on a fresh tensor (or on
    ``dest``, when given: autograd must not track the step) where autograd allows."""
    a = update.transition
    if update.matrix:
        out = x @ a.T
        for w, node in zip(update.weights, update.nodes, strict=True):
            out = out + values[node] @ w.T
        return out if dest is None else dest.copy_(out)
    out = x * a if dest is None else torch.mul(x, a, out=dest)
    inplace = not out.requires_grad
    for w, node in zip(update.weights, update.nodes, strict=True):
        if isinstance(w, Tensor):
            out = out.addcmul_(w, values[node]) if inplace else out + w * values[node]
        else:
            out = out.add_(values[node], alpha=w) if inplace else out.add(values[node], alpha=w)
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


def _product_block(n: int) -> int | None:
    """The largest divisor of ``n`` between 64 and 1024, or ``None``."""
    for block in range(min(n, 1024), 63, -1):
        if n % block == 0:
            return block
    return None


class FiniteChecks:
    """A record, per evaluation of ``N``, that is finite exactly when every entry of ``N`` is; read once, after the
    loop, into one host synchronisation.

    For a float32/float64 (or complex) state of at least 64 entries the record is the product of ``N``, viewed as a
    ``(rows, B)`` matrix, with a zero vector of length ``B``: every row's dot product is 0 when the row is finite and
    NaN otherwise (``inf * 0`` is NaN), so no sum can overflow (a float32 sum of large finite values can), and it is
    one matrix-vector kernel writing ``rows`` numbers into a preallocated buffer. Other states (small ones, half
    precision) record a sum in float64 / complex128."""

    def __init__(self, count: int, like: Tensor) -> None:
        count = max(count, 1)
        self.where: list[int] = []
        self.states: list[bool] = []
        block = _product_block(like.numel())
        dtypes = (torch.float32, torch.float64, torch.complex64, torch.complex128)
        if block is not None and like.dtype in dtypes and like.device.type != "mps":
            self.zeros = torch.zeros(block, dtype=like.dtype, device=like.device)
            self.block = block
            self.records = torch.zeros(count, like.numel() // block, dtype=like.dtype, device=like.device)
        else:
            self.zeros = None
            exact = like.dtype if like.device.type == "mps" else torch.float64
            self.dtype = torch.complex128 if like.is_complex() and exact == torch.float64 else exact
            self.records = torch.zeros(count, 1, dtype=self.dtype, device=like.device)
        self.rows = self.records.unbind(0)

    def record(self, i: int, value: Tensor, state: bool = False) -> None:
        """Record ``value``: the evaluation of ``N`` at grid index ``i``, or (``state``) the state ``x_i``."""
        self.states.append(state)
        row = self.rows[len(self.where)]
        flat = value.detach().reshape(-1)
        if self.zeros is not None:
            torch.mv(flat.view(-1, self.block), self.zeros, out=row)
        else:
            torch.sum(flat, dim=0, keepdim=True, dtype=self.dtype, out=row)
        self.where.append(i)

    def all_finite(self) -> Tensor:
        """A device boolean: every record is finite (nothing is read on the host)."""
        return torch.isfinite(self.records[: len(self.where)]).all()

    def first_bad(self) -> int | None:
        """The grid index of the first non-finite evaluation, or ``None`` (one host synchronisation)."""
        bad = self.first_bad_record()
        return None if bad is None else self.where[bad]

    def first_bad_record(self) -> int | None:
        """The position of the first non-finite record, or ``None`` (one host synchronisation)."""
        n = len(self.where)
        if n == 0:
            return None
        finite = torch.isfinite(self.records[:n]).all(dim=1)
        if bool(finite.all()):
            return None
        return int(torch.nonzero(~finite)[0, 0])


def run_plan(
    plan: Plan,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    times: Tensor,
    outputs: list[int],
    on_step: Callable[[int, Tensor], None] | None = None,
    noise: Callable[[Update], Tensor | None] | None = None,
    shift: list[float] | None = None,
    out: Tensor | None = None,
    exact: bool = False,
) -> list[Tensor]:
    """Execute ``plan`` (placed: :func:`place_plan`) from ``x0`` and return the states at the grid indices
    ``outputs`` (increasing).

    Args:
        nonlinear: ``(t, x) -> N(t, x)``; ``t`` is a 0-dim tensor of the state's real dtype. Its output must have the
            state's shape; it is used in the state's dtype.
        times: the grid on the state's device in the state's real dtype (what ``nonlinear`` receives).
        on_step: called as ``on_step(n, x_n)`` once per grid step, with the final ``x_n``.
        noise: for stochastic methods (:mod:`deis_ode.solvers.stochastic`): ``noise(update)`` is added to the state
            after each main update (``None`` adds nothing). Plans with a warm-up block are not supported.
        shift: with a plan built with ``node_scale = c``: the loop stores ``nonlinear(t_i, x_i) + shift[i] x_i``,
            i.e. ``N_i = c_i (y_i + shift[i] x_i)`` for a model output ``y_i`` (one fused operation per step).
        out: a tensor of shape ``(len(outputs), *x0.shape)`` that receives the wanted states (the returned list holds
            its rows): each is written there by its step, with no copy at the end. Only with grad mode off.
        exact: record every evaluation of N (the replay after a failure); by default the unfused main loop records
            the state every ``order`` steps (see below).

    ``nonlinear`` never receives a tensor that the loop writes later (it may keep its input), and the loop never
    writes into a tensor that ``nonlinear`` returned.

    Finiteness: the warm-up and the fused loop record every evaluation of N; the unfused main loop (large states)
    records the state every ``order`` steps and at the end, a third of the reductions, since a NaN or inf from N
    reaches every later state. A failure found by a state record is located by replaying the solve up to that
    state with a record per evaluation (N is evaluated again; with a deterministic N the error names the exact step,
    otherwise the window of steps).

    Raises:
        FloatingPointError: if N returned NaN or inf; names the first step and time where it did.
    """
    if noise is not None and plan.block:
        raise ValueError("run_plan: noise needs a plan without a warm-up block (warmup='lower_order')")
    if out is not None and torch.is_grad_enabled():
        raise ValueError("run_plan: out= is for solves without autograd (torch.no_grad() or torch.inference_mode())")
    values: dict[int, Tensor] = {}
    checks = FiniteChecks(plan.evaluations + len(plan.main) // plan.order + 2, x0)
    grid = times.unbind(0) if isinstance(times, Tensor) else list(times)  # 0-dim views: cheaper than indexing
    dtype, shape = x0.dtype, x0.shape
    order = plan.order
    ring: list[Tensor] | None = None  # buffers for y + shift x, the loop's own tensors (never seen by user code)

    def evaluate(i: int, x: Tensor, record: bool = True) -> None:
        out = nonlinear(grid[i], x)
        if not isinstance(out, Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the model (or N(t, x)) returned {got}; expected a tensor of the state's shape {tuple(shape)}"
            )
        if out.dtype != dtype:
            out = out.to(dtype)
        if shift is not None and shift[i] != 0.0:
            out = (
                torch.add(out, x, alpha=shift[i])
                if ring is None
                else torch.add(out, x, alpha=shift[i], out=ring[i % order])
            )
        values[i] = out
        if record:
            checks.record(i, out)

    position = {index: k for k, index in enumerate(outputs)}
    results: dict[int, Tensor] = {}

    def keep(i: int, x: Tensor) -> Tensor:
        """Keep ``x`` as the state at grid index ``i`` (copied into ``out`` when given)."""
        if out is not None:
            x = out[position[i]].copy_(x)
        results[i] = x
        return x

    states: dict[int, Tensor] = {0: x0}
    if 0 in position:
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
            if update.target in position:
                states[update.target] = keep(update.target, states[update.target])
    x = states[max(states)]
    del states
    main = plan.main
    fused_check = None
    direct = False  # wanted states written straight into ``out`` by their step
    if main:
        if on_step is not None:
            on_step(main[0].source, x)
        if shift is not None and not torch.is_grad_enabled() and x.numel() > FUSED_MAX_ELEMENTS:
            ring = torch.empty((order, *shape), dtype=dtype, device=x0.device).unbind(0)  # one allocation
        evaluate(main[0].source, x)
        if noise is None and _fusable(main, x, values[main[0].source]):
            reached, fused_check = run_fused(main, order, nonlinear, x, values, grid, set(position), on_step, shift)
            for i, state in reached.items():
                keep(i, state)
            main = []
        elif not _tracked(main, x, values[main[0].source]):
            direct = out is not None and noise is None
            if shift is not None and ring is None:
                ring = torch.empty((order, *shape), dtype=dtype, device=x0.device).unbind(0)
    # The unfused main loop records the state every ``order`` steps instead of every evaluation of N: a NaN or inf
    # from N reaches every later state (IEEE arithmetic: NaN and inf survive any linear combination, 0 * inf is
    # NaN), so the records catch it; on failure the steps since the last finite record are replayed with a record
    # per evaluation to name the step (``exact``).
    per_state = bool(main) and not exact
    for k, update in enumerate(main):
        if k > 0:
            if on_step is not None:
                on_step(update.source, x)
            if per_state and k % order == 0:
                checks.record(update.source, x, state=True)
            evaluate(update.source, x, record=not per_state)
        target = update.target
        if direct and target in position:
            x = results[target] = apply_update(update, x, values, out[position[target]])
        else:
            x = apply_update(update, x, values)
            if noise is not None:
                increment = noise(update)
                if increment is not None:
                    x = x + increment
            if target in position:
                x = keep(target, x)
        values.pop(target - order, None)

    if per_state:
        checks.record(main[-1].target, x, state=True)
    flags = [checks.all_finite()]
    if fused_check is not None:
        flags.append(fused_check.all_finite())
    if not bool(torch.stack(flags).all()):  # the loop's single host synchronisation
        record = checks.first_bad_record()
        bad = fused_check.first_bad() if record is None else checks.where[record]
        if record is not None and checks.states[record]:
            # the state x_bad is the first non-finite one recorded: N failed at one of the steps since the last
            # finite record; replay the solve up to x_bad, recording every evaluation, to name the step
            since = max([checks.where[r] for r in range(record) if checks.states[r]], default=main[0].source)
            upto = dataclasses.replace(plan, main=[u for u in plan.main if u.target <= bad], placed={})
            run_plan(upto, nonlinear, x0, times, [0], None, noise, shift, exact=True)
            raise FloatingPointError(
                f"the state became NaN or inf between grid steps {since} and {bad} (t = {grid[since].item():.8g} to "
                f"{grid[bad].item():.8g}), though a replay of the solve found N(t, x) finite at every step: the state "
                "overflowed there, or N is not deterministic (it returned NaN or inf in the first run only)"
            )
        raise FloatingPointError(
            f"the nonlinear part N(t, x) returned NaN or inf at grid step {bad} (t = {grid[bad].item():.8g}); "
            "the model or the state diverged there"
        )
    return [results[i] for i in outputs]


def _tracked(updates: list[Update], x: Tensor, value: Tensor | None) -> bool:
    """Whether autograd tracks the steps: grad mode on and the state, the first evaluation or a coefficient requires
    grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or (value is not None and value.requires_grad):
        return True
    distinct = {id(u.weights): u for u in updates}.values()
    return any(isinstance(c, Tensor) and c.requires_grad for u in distinct for c in (u.transition, *u.weights))
