r"""Error-controlled exponential Adams methods: the stepper behind ``adaptive_deis2`` .. ``adaptive_deis5``.

``adaptive_deisK`` is a variable-step exponential Adams predictor-corrector in PEC mode. On the step from ``t_n`` to
``t_{n+1} = t_n + h``, with ``p = K - 1`` past values of ``N`` (fewer while they accumulate):

    P:  x^P = Phi(t_{n+1}, t_n) x_n + sum_{j<p} C^P_j N_{n-j}           (the p-node exponential Adams-Bashforth step)
    E:  N_{n+1} = N(t_{n+1}, x^P)                                       (the step's one evaluation)
    C:  x_{n+1} = Phi x_n + C^C_new N_{n+1} + sum_{j<p} C^C_j N_{n-j}   (the (p+1)-node polynomial through t_{n+1})

with weights for the actual (unequal) steps. ``e = x_{n+1} - x^P`` is the error estimate: to leading order it is the
local error of the predictor, ``O(h^{p+1}) = O(h^K)``, while the corrected state that the solve advances with has a
local error ``O(h^{K+1})`` (global order ``K``): local extrapolation, as in Dormand-Prince pairs, which makes the
achieved error proportional to the tolerance. ``N`` is not re-evaluated at the corrected state (PEC): the stored
``N_{n+1}`` is off by ``O(h^K)``, which enters the next steps multiplied by a weight ``O(h)``. A rejected step costs
its one evaluation. docs/method.md (*Error-controlled stepping*) has the derivation.

Step-size control (per attempted step, on the host; the scaled error norm is the only device value read, once per
step):

    r = norm(e / (atol + rtol max(|x_n|, |x_{n+1}|)))          accept when r <= 1,
    h_new = h min(safety r^{-1/K'}, safety r^{-1/K'} (h / h_prev) (r_prev / r)^{1/K'})

(``K' = p + 1``, the order of the estimate; the second factor is Gustafsson's predictive controller, and the smaller
of the two is taken, as in Hairer and Wanner's RADAU5), bounded by ``[dfactor, ifactor]``; after a rejection the
step shrinks by ``max(dfactor, safety r^{-1/K'})`` and the next accepted step may not grow. A rejected step is
dropped: the history keeps accepted points only. The first step is exponential Euler corrected by the exponential
trapezoidal rule, at the guess of Hairer, Norsett and Wanner (Solving ODEs I, II.4) from ``|x_0|`` and
``|W(t_0) N_0|``;
its own estimate corrects the guess (it may shrink 1000x or grow 100x), and the order rises by one per accepted step
until ``p = K - 1``.

With a constant diagonal ``L``, steps lie on the ladder ``2^(m/8)``, and an accepted step keeps its size unless the
controller asks for less than 0.9x or at least 1.5x of it: a steady stretch of steps then has one geometry, whose
coefficients are computed once and reused (the host work of a step is then a dictionary look-up). Other forms
compute their coefficients every step and take the controller's step as it is.

Arithmetic: a small CPU state outside autograd (at most ``FUSED_MAX_ELEMENTS`` elements) steps in numpy on views of
the same memory, in the monomial form of the same weights: with ``A = V^{-1}`` (``V`` the Vandermonde matrix of the
nodes in units of the step) and ``B_k = h (k-1)! phi_k(h L)``,

    x^P = Phi x_n + sum_k B_{k+1} (A [N_n, ..])_k,        e = sum_k B_{k+1} (D [N_{n+1}, N_n, ..])_k,

so the per-element factors ``B`` depend on the step size only (one phi evaluation per ladder step, whatever the
steps before it) and the geometry enters through small real matrices ``A``, ``D`` (one matrix product each, cached
by step ratios across solves); another small state uses a few stacked torch operations; a large one makes one pass
per term with per-geometry weights.

Output times are stepped to exactly: a step that would pass the next requested time is shortened to end on it (and
one that would leave less than a step is split in two halves), so the outputs carry the method's own order and no
interpolation error. The proposed step survives such a clipped step.

Coefficients: for a constant diagonal ``L``, ``W = 1`` and the basis ``t`` they are computed on the host in numpy,
float64, from :func:`~deis_ode.solvers.phi.phi_functions_host` and a small Vandermonde solve for the Lagrange
weights, on the distinct values of ``L`` only (a Fourier symbol repeats most of its values); every other form goes
through :func:`~deis_ode.solvers.coefficients.step_coefficients` (dense matrices, time-dependent ``L``, weights,
diffusion drifts). A sparse or matrix-free operator ``A`` forms none: its predictor and estimate are two Krylov
products per step (:mod:`deis_ode.solvers.adaptive_krylov`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchdiffeq._impl.misc import _rms_norm

from ..forms import ExponentialForm, OperatorForm
from ..linear.krylov import KrylovError
from .adaptive_krylov import OperatorSteps, krylov_tolerance
from .coefficients import step_coefficients
from .multistep import FUSED_MAX_ELEMENTS, constant_diagonal, place_coefficient
from .phi import phi_functions_host

F64 = torch.float64

#: Largest growth of a step that uses one node of N (exponential Euler: no extrapolation, so no step-ratio limit).
ONE_NODE_IFACTOR = 100.0
#: Smallest step relative to the current time before the solve gives up (``h < UNDERFLOW * max(|t|, |t_out|)``).
UNDERFLOW = 1e-14
#: Memory for cached coefficient stacks of the diagonal path (bytes; at least 4 stacks are kept).
CACHE_BYTES = 64 * 2**20
#: Step sizes lie on the ladder ``2^(m / LADDER)``; an accepted step keeps its size unless the controller asks for
#: at least ``KEEP`` times more or less than ``KEEP_LOW`` times as much, so that steady stretches reuse their
#: coefficients (a lower bound of 0.9 rather than 1 avoids recomputing them when an accepted step asks for a slightly
#: smaller one).
LADDER = 8
KEEP = 1.5
KEEP_LOW = 0.9
#: Tolerances below ``MIN_RTOL_ULPS`` units of round-off of the state's real dtype are refused.
MIN_RTOL_ULPS = 8.0
#: Mixing matrices of the host path kept (by step ratios; pure geometry, shared by all solves; a few kB each).
MIXES_CACHED = 4096
_MIXES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


@dataclass
class AdaptiveStats:
    """What one adaptive solve did."""

    accepted: int = 0
    rejected: int = 0
    evaluations: int = 0  # evaluations of N
    t_reached: float = math.nan  # the last accepted time (user time)
    smallest_step: float = math.inf
    largest_step: float = 0.0

    @property
    def attempted(self) -> int:
        return self.accepted + self.rejected


@dataclass
class Controls:
    """Tolerances and controller settings (validated by the caller)."""

    rtol: float | Tensor
    atol: float | Tensor
    norm: Callable[[Tensor], Tensor]
    safety: float = 0.9
    ifactor: float = 5.0
    dfactor: float = 0.2
    first_step: float | None = None
    max_num_steps: int = 100_000


def _factorials(n: int) -> np.ndarray:
    return np.array([math.factorial(i) for i in range(n)], dtype=np.float64)


def _exponential_weights(theta: list[float], h: float, phis: np.ndarray) -> np.ndarray:
    """``C_j = h sum_k a_jk k! phi_{k+1}`` for the Lagrange basis through ``theta`` (``phis`` holds
    ``phi_1 .. phi_k``, shape ``(k, U)``): the coefficients of the Lagrange basis are ``a = V^{-T}``, with ``V`` the
    ``k x k`` Vandermonde matrix of the nodes (``k <= 5``, nodes within a few steps of each other: well conditioned),
    and enter through one small product (three times faster than a solve with ``U`` right-hand sides)."""
    k = len(theta)
    if k == 1:
        return h * phis[:1]
    vander = np.vander(np.asarray(theta, dtype=np.float64), k, increasing=True)
    return (np.linalg.inv(vander.T) * (h * _factorials(k))) @ phis


class DiagonalCoefficients:
    """Per-step coefficients for a constant diagonal ``L``, ``W = 1``, basis ``t``, on the host in numpy.

    The phi-functions are evaluated on the distinct values of ``L`` only and scattered back, so a Fourier symbol
    with many repeated values costs what its distinct values cost.
    """

    def __init__(self, linear: Tensor, like: Tensor, large: bool = False) -> None:
        self.large = large
        lin = linear.detach().to("cpu")
        lin = lin.to(torch.complex128 if lin.is_complex() else F64).numpy()
        self.shape = lin.shape
        flat = lin.reshape(-1)
        values, inverse = np.unique(flat, return_inverse=True)
        if values.size * 2 <= flat.size:
            self.values, self.inverse = values, torch.from_numpy(inverse.reshape(-1)).to(like.device)
        else:
            self.values, self.inverse = flat, None
        complex_coefficients = np.iscomplexobj(lin)
        if complex_coefficients and not like.is_complex() and np.any(lin.imag != 0):
            raise ValueError(
                "the linear part is complex but the state is real: the solution would be complex; pass a complex "
                "initial state"
            )
        # the state's own dtype: for a complex state, complex * complex products are about 2x faster than real * complex
        self.dtype = like.dtype
        self.complex_coefficients = complex_coefficients and like.is_complex()
        self.device = like.device
        self.pad = like.dim() - lin.ndim  # leading dimensions of the state that L broadcasts over
        self.cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self.phis: OrderedDict[tuple, np.ndarray] = OrderedDict()
        per_stack = 12 * flat.size * like.element_size()
        self.cache_size = int(min(32, max(4, CACHE_BYTES // per_stack)))

    def weights(self, h: float, thetas: list[list[float]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``Phi`` and, for each list of nodes ``theta`` (in units of the step, from ``t_n``), the weights
        ``C_j = h sum_k a_jk k! phi_{k+1}(L h)``, on the distinct values of ``L``."""
        kmax = max(len(theta) for theta in thetas)
        phis = self.phis.get((h, kmax))  # a new geometry often has a known step (the steps after a change of size)
        if phis is None:
            phis = phi_functions_host(self.values * h, kmax)  # (kmax + 1, U)
            self.phis[(h, kmax)] = phis
            if len(self.phis) > self.cache_size:
                self.phis.popitem(last=False)
        return phis[0], [_exponential_weights(theta, h, phis[1 : len(theta) + 1]) for theta in thetas]

    def place(self, out: np.ndarray) -> Tensor:
        """Coefficients ``(..., U)`` on the distinct values as a tensor ``(..., *1, *L)`` in the state's dtype
        (converted at the size of the distinct values, then scattered by one gather)."""
        if not self.complex_coefficients and np.iscomplexobj(out):
            out = out.real
        placed = torch.from_numpy(np.ascontiguousarray(out)).to(device=self.device, dtype=self.dtype)
        if self.inverse is not None:
            placed = placed.index_select(-1, self.inverse)
        return placed.reshape(*out.shape[:-1], *([1] * self.pad), *self.shape)

    def host_basis(self, h: float, kmax: int, shape: tuple[int, ...]) -> np.ndarray:
        """``[Phi, h 0! phi_1, h 1! phi_2, .., h (kmax-1)! phi_kmax]`` at ``h L``, as a numpy array
        ``(kmax + 1, *shape)`` in the state's dtype (``shape``: the state's): the per-element factors of the monomial
        form of a step (see :meth:`host_mixes`). They depend on the step only, not on the steps before it, so one
        evaluation serves every geometry with this step. Cached by ``h``."""
        key = ("basis", h, kmax)
        cached = self.phis.get(key)
        if cached is not None:
            self.phis.move_to_end(key)
            return cached
        phis = phi_functions_host(self.values * h, kmax)  # (kmax + 1, U)
        phis[1:] *= (h * _factorials(kmax))[:, None]
        if not self.complex_coefficients and np.iscomplexobj(phis):
            phis = phis.real
        if self.inverse is not None:
            phis = phis[:, self.inverse.cpu().numpy()]
        dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        phis = phis.reshape(kmax + 1, *([1] * self.pad), *self.shape).astype(dtype)
        basis = np.ascontiguousarray(np.broadcast_to(phis, (kmax + 1, *shape)))
        self.phis[key] = basis
        if len(self.phis) > self.cache_size:
            self.phis.popitem(last=False)
        return basis

    def host_mixes(self, h: float, previous: tuple[float, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """``(A, D)`` for a step ``h`` after the steps ``previous`` (newest first): with ``B`` =
        :meth:`host_basis`, the predictor is ``x^P = B_0 x_n + sum_k B_{k+1} (A [N_n, .., N_{n-p+1}])_k`` (``A =
        V^{-1}``, ``V`` the ``p x p`` Vandermonde matrix of the nodes ``theta`` in units of the step: ``A`` maps the
        values to the monomial coefficients of their interpolating polynomial) and the estimate (corrector minus
        predictor) is ``e = sum_k B_{k+1} (D [N_{n+1}, N_n, .., N_{n-p+1}])_k``, ``D`` the corrector's ``V^{-1}``
        through ``[1, theta]`` minus ``A`` (shifted one column). Real ``dtype`` matrices, cached by the ratios of the
        steps (on the ladder they repeat across step sizes, and across solves: they depend on no problem data)."""
        theta = [0.0]
        for step in previous:
            theta.append(theta[-1] - step / h)
        key = (*(round(t, 12) for t in theta), dtype)
        cached = _MIXES.get(key)
        if cached is not None:
            return cached
        p = len(theta)
        mix_p = np.linalg.inv(np.vander(np.asarray(theta), p, increasing=True))
        mix_d = np.linalg.inv(np.vander(np.asarray([1.0, *theta]), p + 1, increasing=True))
        mix_d[:p, 1:] -= mix_p
        pair = (mix_p.astype(dtype), mix_d.astype(dtype))
        if len(_MIXES) >= MIXES_CACHED:
            _MIXES.clear()
        _MIXES[key] = pair
        return pair

    def step(self, h: float, previous: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        """``(P, Q)`` for a step ``h`` after the steps ``previous`` (newest first, ``p - 1`` of them).

        ``P`` (``(p + 1, *L)``) against ``[x_n, N_n, .., N_{n-p+1}]`` is the ``p``-node predictor
        ``[Phi, C_0 .. C_{p-1}]``. ``Q`` (``(2, p + 2, *L)``) against ``[x_n, N_n, .., N_{n-p+1}, N_{n+1}]`` holds the
        corrector through the ``p + 1`` nodes ``t_{n+1}, t_n, ..`` (row 0) and the corrector minus the predictor
        (row 1: the error estimate); for a large state (``large``) ``Q`` is only the estimate's weights
        ``[D_0 .. D_{p-1}, D_new]`` (``(p + 1, *L)``), as the state is then advanced by ``x^P + e``. Cached by
        geometry (the controller keeps the step on a ladder of sizes, so a steady step reuses its coefficients)."""
        key = (h, previous)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache.move_to_end(key)
            return cached
        theta = [0.0]
        for step in previous:
            theta.append(theta[-1] - step / h)
        p = len(theta)
        transition, (predictor, corrector) = self.weights(h, [theta, [1.0, *theta]])
        if self.large:  # only P and the estimate's weights [D_0 .. D_{p-1}, D_new]: fewer rows to scatter
            out = np.empty((2 * p + 2, transition.size), dtype=transition.dtype)
            out[0] = transition
            out[1 : p + 1] = predictor
            out[p + 1 : 2 * p + 1] = corrector[1:] - predictor
            out[2 * p + 1] = corrector[0]
            placed = self.place(out)
            pair = (placed[: p + 1], placed[p + 1 :])
        else:
            out = np.zeros((3 * p + 5, transition.size), dtype=transition.dtype)
            out[0] = transition
            out[1 : p + 1] = predictor
            q = p + 1  # row 0 of Q
            out[q] = transition
            out[q + 1 : q + p + 1] = corrector[1:]
            out[q + p + 1] = corrector[0]
            e = q + p + 2  # row 1 of Q
            out[e + 1 : e + p + 1] = corrector[1:] - predictor
            out[e + p + 1] = corrector[0]
            placed = self.place(out)
            pair = (placed[:q], placed[q:].reshape(2, p + 2, *placed.shape[1:]))
        self.cache[key] = pair
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return pair


class GeneralCoefficients:
    """Per-step coefficients of any form through :func:`step_coefficients` (two calls per step: ``k`` and ``k - 1``
    nodes)."""

    def __init__(self, form: ExponentialForm, basis: str, like: Tensor) -> None:
        self.form, self.basis, self.like = form, basis, like
        self.matrix = bool(getattr(form, "matrix", False))

    def _coefficients(self, s_a: float, s_b: float, nodes: list[float]) -> tuple[Tensor, Tensor]:
        a, b = torch.tensor(s_a, dtype=F64), torch.tensor(s_b, dtype=F64)
        return step_coefficients(self.form, self.basis, a, b, torch.tensor(nodes, dtype=F64))

    def step(self, s_a: float, s_b: float, nodes: list[float]) -> tuple[list, list]:
        """``([Phi, C_0 .. C_{p-1}], [D_new, D_0 .. D_{p-1}])`` (placed) for the step from ``s_a`` to ``s_b`` (user
        times) with the ``p`` past nodes ``nodes`` (newest first): as :meth:`DiagonalCoefficients.step`."""
        transition, predictor = self._coefficients(s_a, s_b, nodes)
        _, corrector = self._coefficients(s_a, s_b, [s_b, *nodes])
        corrector = corrector.clone()
        corrector[1:] -= predictor
        first = [self._place(c) for c in (transition, *predictor.unbind(0))]
        return first, [self._place(c) for c in corrector.unbind(0)]

    def _place(self, c: Tensor) -> Tensor | float:
        """A coefficient on the state's device and dtype; a real matrix of a complex state becomes complex (a
        matrix product, unlike an elementwise one, needs both factors in one dtype)."""
        placed = place_coefficient(c, self.like)
        if self.matrix and isinstance(placed, Tensor) and self.like.is_complex() and not placed.is_complex():
            placed = placed.to(self.like.dtype)
        return placed


def ladder(h: float) -> float:
    """The largest step ``2^(m / LADDER)`` (integer ``m``) not above ``h``."""
    m = math.floor(LADDER * math.log2(h) + 1e-9)
    return 2.0 ** (m / LADDER)


def _combine(coefficients: list, values: list[Tensor], matrix: bool) -> Tensor:
    """``sum_i c_i v_i`` (``v @ c.T`` for matrices)."""
    out = None
    for c, v in zip(coefficients, values, strict=True):
        term = v @ c.T if matrix else c * v
        out = term if out is None else out + term
    return out


def integrate_adaptive(
    form: ExponentialForm,
    basis: str,
    nonlinear: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    outputs: list[float],
    sign: float,
    order: int,
    controls: Controls,
    stats: AdaptiveStats,
    callbacks: dict[str, Callable] | None = None,
    weight: Callable[[Tensor], float | Tensor] | None = None,
    krylov: OperatorSteps | None = None,
) -> list[Tensor]:
    """Integrate from ``outputs[0]`` through every later output time (the solver's increasing time ``tau``; the
    user's time is ``sign * tau``) with the ``order``-node method under error control; return the states at
    ``outputs[1:]``. ``callbacks`` (torchdiffeq's ``callback_step``, ``callback_accept_step``,
    ``callback_reject_step``) receive the solver's time and step, as torchdiffeq's own solvers pass them; ``weight``
    is ``W(t)``, used by the first guess of the step. For an :class:`~deis_ode.forms.OperatorForm`, ``krylov``
    applies the steps by Krylov products (:mod:`deis_ode.solvers.adaptive_krylov`; default: its tolerance rule and
    largest dimension) and accumulates their counters.

    Raises:
        FloatingPointError: ``N`` returned NaN or inf (names the time).
        KrylovError: a Krylov product of an operator form did not converge (names the time).
        RuntimeError: the step underflowed, or ``max_num_steps`` attempted steps did not reach the last output
            (both name the time reached).
    """
    callbacks = callbacks or {}
    real = x0.real.dtype if x0.is_complex() else x0.dtype
    fast = constant_diagonal(form, basis) and not x0.requires_grad
    small = x0.numel() <= FUSED_MAX_ELEMENTS
    diagonal = DiagonalCoefficients(form.constant_linear, x0, large=not small) if fast else None
    if isinstance(form, OperatorForm) and krylov is None:
        krylov = OperatorSteps(form.operator, krylov_tolerance(x0.dtype, controls.rtol, None))
    elif not isinstance(form, OperatorForm):
        krylov = None
    general = None if (fast or krylov is not None) else GeneralCoefficients(form, basis, x0)
    matrix = bool(getattr(form, "matrix", False))

    def user(tau: float) -> float:
        return sign * tau

    on_cpu = x0.device.type == "cpu"
    real_np = torch.empty((), dtype=real).numpy().dtype if on_cpu and real != torch.bfloat16 else None

    def evaluate(tau: float, x: Tensor) -> Tensor:
        stats.evaluations += 1
        if real_np is not None:  # a 0-dim CPU tensor through numpy: a quarter of torch.tensor's cost
            return nonlinear(torch.from_numpy(np.array(user(tau), dtype=real_np)), x)
        return nonlinear(torch.tensor(user(tau), dtype=real, device=x0.device), x)

    rms = controls.norm is _rms_norm  # torchdiffeq's default norm: computed from squared magnitudes below

    def squared(v: Tensor) -> Tensor:
        """``|v|^2`` without the complex absolute value (a hypot per element)."""
        return v.real.square().addcmul_(v.imag, v.imag) if v.is_complex() else v.square()

    def error_ratio(est: Tensor, x: Tensor, x_new: Tensor, x_mag: Tensor | None) -> tuple[float, Tensor | None]:
        """``norm(est / (atol + rtol max(|x|, |x_new|)))`` and a magnitude of ``x_new`` that the next step reuses as
        ``x_mag`` (``|x_new|`` for a small state, ``|x_new|^2`` for a large one); the step's one host
        synchronisation."""
        if not rms:
            scale = controls.atol + controls.rtol * torch.maximum(x.abs(), x_new.abs())
            return float(controls.norm(est / scale)), None
        if small:  # few operations: the complex absolute value costs little on a small state
            new_mag = x_new.abs()
            scale = torch.maximum(x.abs() if x_mag is None else x_mag, new_mag).mul_(controls.rtol).add_(controls.atol)
            return float(torch.linalg.vector_norm(est / scale)) / math.sqrt(est.numel()), new_mag
        # few passes: squared magnitudes, no complex absolute value (a hypot per element)
        new_mag = squared(x_new)
        scale = torch.maximum(squared(x) if x_mag is None else x_mag, new_mag).sqrt_().mul_(controls.rtol)
        scale = scale.add_(controls.atol).square_()
        return math.sqrt(float((squared(est) / scale).mean())), new_mag

    def check_finite(tau: float, value: Tensor) -> None:
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(
                f"the nonlinear part N(t, x) returned NaN or inf at t = {user(tau):.10g} (after "
                f"{stats.accepted} accepted steps); the model or the state diverged there"
            )

    def state_scale(x: Tensor) -> Tensor:
        return controls.atol + controls.rtol * x.abs()

    tau0 = outputs[0]
    x = x0
    times: list[float] = [tau0]  # accepted times, newest last (at most order kept)
    steps: list[float] = []  # the accepted steps between them
    values: list[Tensor] = []  # N at those times (filled lazily: N at the final time is never needed)
    stats.t_reached = user(tau0)
    span = outputs[-1] - tau0
    if controls.first_step is not None:
        h = float(controls.first_step)
    else:
        # Hairer-Norsett-Wanner's first guess from |x0| and |W N0| (the part the polynomial carries; the linear part
        # is integrated exactly and does not limit the step)
        values.append(evaluate(tau0, x))
        w0 = 1.0 if weight is None else abs(float(weight(torch.tensor(user(tau0), dtype=F64))))
        d0 = float(controls.norm(x / state_scale(x)))
        d1 = w0 * float(controls.norm(values[0] / state_scale(x)))
        if not math.isfinite(d1):
            check_finite(tau0, values[0])
        h = 1e-6 * span if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    # the diagonal path keeps its steps on a ladder, so that coefficients are reused; the others compute theirs
    # every step anyway and take the controller's step as it is
    on_ladder = ladder if diagonal is not None else (lambda value: value)
    h = min(h, span) if controls.first_step is not None else on_ladder(min(h, span))
    ratio_prev, step_prev = 1.0, None
    x_mag = None  # the magnitude of the current state, when the last step computed it
    host = small and fast and on_cpu and rms and real_np is not None  # see the host branch of the loop
    host_ratio = None

    def as_numpy(tol: float | Tensor):
        return tol.detach().cpu().numpy() if isinstance(tol, Tensor) else tol

    rtol_np, atol_np = as_numpy(controls.rtol), as_numpy(controls.atol)
    x_shape = tuple(x0.shape)
    state_np = x0.detach().numpy().dtype if host else None

    def as_real(a: np.ndarray) -> np.ndarray:
        """``(rows, *shape)`` as ``(rows, n)`` real numbers (a complex array as interleaved pairs): the mixing
        matrices are real, so one real matrix product mixes a complex stack."""
        flat = a.reshape(a.shape[0], -1)
        return flat.view(real_np) if np.iscomplexobj(flat) else flat

    buffers = {}  # per number of past nodes: the host branch's work arrays and their real views
    host_mixes: dict = {}  # the mixing matrices by (step, previous steps oldest first): this solve's look-up
    if host:
        for q in range(1, order):
            pair = [np.empty((q + 1, *x_shape), dtype=state_np) for _ in range(2)]
            buffers[q] = (*pair, *(as_real(a) for a in pair))

    rejected_last = False
    results: list[Tensor] = []
    attempts = 0
    for t_out in outputs[1:]:
        while times[-1] < t_out:
            tau = times[-1]
            if len(values) < len(times):
                values.append(evaluate(tau, x))
            if host and values[-1].requires_grad:
                host, x_mag = False, None
            rem = t_out - tau
            if h >= rem:
                step = rem
            elif 2.0 * h > rem:
                step = 0.5 * rem
            else:
                step = h
            if step <= UNDERFLOW * max(abs(tau), abs(t_out), abs(span)):
                raise RuntimeError(
                    f"adaptive_deis{order}: the step size underflowed to {step:.3g} at t = {user(tau):.10g} after "
                    f"{stats.accepted} accepted and {stats.rejected} rejected steps: the tolerance cannot be met "
                    "there (N not smooth in t, or a tolerance too tight for the state's precision)"
                )
            attempts += 1
            if attempts > controls.max_num_steps:
                raise RuntimeError(
                    f"adaptive_deis{order}: max_num_steps = {controls.max_num_steps} exceeded: reached "
                    f"t = {user(tau):.10g} of [{user(tau0):.10g}, {user(outputs[-1]):.10g}] after {stats.accepted} "
                    f"accepted and {stats.rejected} rejected steps (last step {step:.3g}); raise max_num_steps or "
                    "loosen rtol/atol"
                )
            if "callback_step" in callbacks:
                callbacks["callback_step"](tau, x, step)
            first_step = stats.accepted == 0
            p = min(order - 1, len(times))  # past nodes of the predictor
            tau_new = tau + step
            history = [values[-1 - j] for j in range(p)]
            if krylov is not None:
                # a sparse or matrix-free A: one Krylov product for the predictor, one for the estimate
                h_user = user(tau_new) - user(tau)
                mix_p, mix_d = krylov.mixes(h_user, [user(times[-1 - j]) for j in range(p)])
                n_new = None
                try:
                    x_pred = krylov.predict(h_user, x, history, mix_p, user(tau))
                    n_new = evaluate(tau_new, x_pred)
                    est = krylov.estimate(h_user, n_new, history, mix_d, user(tau))
                except KrylovError:
                    check_finite(tau, values[-1])  # a NaN in N shows as a Krylov failure: name the real cause
                    if n_new is not None:
                        check_finite(tau_new, n_new)
                    raise
                x_new = x_pred + est
            elif general is not None:
                nodes = [user(times[-1 - j]) for j in range(p)]
                predictor, difference = general.step(user(tau), user(tau_new), nodes)
                x_pred = _combine(predictor, [x, *history], matrix)
                n_new = evaluate(tau_new, x_pred)
                est = _combine(difference, [n_new, *history], matrix)
                x_new = x_pred + est
            elif host and p == len(history):
                # a small CPU state outside autograd: the step's arithmetic in numpy on views of the same memory
                # (a numpy operation on a few thousand numbers costs a fifth of a torch dispatch), in the monomial
                # form: the per-element factors depend on the step only (one set per ladder step), the mixing of the
                # values on the geometry only (small matrices)
                basis = diagonal.host_basis(sign * step, order, x_shape)
                geometry = (step, *steps[len(steps) - p + 1 :]) if p > 1 else step
                mixes = host_mixes.get(geometry)
                if mixes is None:
                    previous = tuple(sign * s for s in reversed(steps[len(steps) - p + 1 :])) if p > 1 else ()
                    mixes = host_mixes[geometry] = diagonal.host_mixes(sign * step, previous, real_np)
                mix_p, mix_d = mixes
                stacked, mixed, stacked_real, mixed_real = buffers[p]  # [N_{n+1}, N_n, ..]; [x_n, monomials]
                for j in range(p):
                    stacked[j + 1] = values[-1 - j].numpy()
                x_np = x.numpy()
                mixed[0] = x_np
                np.matmul(mix_p, stacked_real[1:], out=mixed_real[1:])
                pred_np = (basis[: p + 1] * mixed).sum(0)
                x_pred = torch.from_numpy(pred_np)
                n_new = evaluate(tau_new, x_pred)
                if n_new.requires_grad or n_new.device.type != "cpu" or n_new.dtype != x.dtype:
                    host, x_mag = False, None  # N is tracked by autograd (or moved): the torch path from here on
                    previous = tuple(sign * s for s in reversed(steps[len(steps) - p + 1 :])) if p > 1 else ()
                    _, corrector = diagonal.step(sign * step, previous)
                    x_new, est = (corrector * torch.stack([x, *history, n_new])).sum(1).unbind(0)
                else:
                    stacked[0] = n_new.numpy()
                    np.matmul(mix_d, stacked_real, out=mixed_real)
                    est_np = (basis[1 : p + 2] * mixed).sum(0)
                    new_np = pred_np + est_np
                    magnitude = np.abs(new_np)
                    mag_x = np.abs(x_np) if x_mag is None else x_mag
                    scale = np.maximum(mag_x, magnitude) * rtol_np + atol_np
                    scaled = np.abs(est_np).reshape(-1)
                    scaled /= scale.reshape(-1)
                    x_new, est = torch.from_numpy(new_np), torch.from_numpy(est_np)
                    host_ratio = (math.sqrt(float(np.dot(scaled, scaled)) / scaled.size), magnitude)
            elif small:
                # a small state: a few operations on stacked values (each operation costs its dispatch)
                previous = tuple(sign * s for s in reversed(steps[len(steps) - p + 1 :])) if p > 1 else ()
                predictor, corrector = diagonal.step(sign * step, previous)
                x_pred = (predictor * torch.stack([x, *history])).sum(0)
                n_new = evaluate(tau_new, x_pred)
                x_new, est = (corrector * torch.stack([x, *history, n_new])).sum(1).unbind(0)
            else:
                # a large state: one pass per term, no stacked copies
                previous = tuple(sign * s for s in reversed(steps[len(steps) - p + 1 :])) if p > 1 else ()
                predictor, corrector = diagonal.step(sign * step, previous)
                x_pred = x * predictor[0]
                for c, v in zip(predictor[1:], history, strict=True):
                    x_pred.addcmul_(c, v)
                n_new = evaluate(tau_new, x_pred)
                est = n_new * corrector[-1]
                for c, v in zip(corrector[:-1], history, strict=True):
                    est.addcmul_(c, v)
                x_new = x_pred + est
            if host_ratio is not None:
                (ratio, new_mag), host_ratio = host_ratio, None
            else:
                ratio, new_mag = error_ratio(est, x, x_new, x_mag)
            if not math.isfinite(ratio):
                check_finite(tau, values[-1])
                check_finite(tau_new, n_new)
                ratio = math.inf
            exponent = 1.0 / (p + 1)  # the estimate is the local error of the p-node predictor, O(h^(p+1))
            if ratio <= 1.0:
                if "callback_accept_step" in callbacks:
                    callbacks["callback_accept_step"](tau, x, step)
                stats.accepted += 1
                stats.smallest_step = min(stats.smallest_step, step)
                stats.largest_step = max(stats.largest_step, step)
                times.append(t_out if step == rem else tau_new)
                x, x_mag = x_new, new_mag
                stats.t_reached = user(times[-1])
                values.append(n_new)  # N at the predicted state (PEC: not re-evaluated at the corrected one)
                steps.append(step)
                if len(times) > order - 1:
                    del times[0]
                    del values[0]
                    del steps[0]
                if ratio == 0.0:
                    factor = ONE_NODE_IFACTOR if first_step else controls.ifactor
                else:
                    factor = controls.safety * ratio ** (-exponent)  # elementary (deadbeat) controller
                    if step_prev is not None:
                        # Gustafsson's predictive controller; the smaller factor is taken (as in RADAU5)
                        predictive = factor * (step / step_prev) * (ratio_prev / ratio) ** exponent
                        factor = min(factor, predictive)
                upper = 1.0 if rejected_last else (ONE_NODE_IFACTOR if first_step else controls.ifactor)
                factor = min(max(factor, controls.dfactor), upper)
                # a step shortened to meet an output time keeps the size the controller had proposed
                proposed = max(h, step * factor) if step < h else step * factor
                if rejected_last or not (KEEP_LOW * h <= proposed < KEEP * h) or diagonal is None:
                    h = on_ladder(proposed)
                ratio_prev, step_prev = max(ratio, 1e-10), step
                rejected_last = False
            else:
                if "callback_reject_step" in callbacks:
                    callbacks["callback_reject_step"](tau, x, step)
                stats.rejected += 1
                lower = 1e-3 if first_step else controls.dfactor  # the first guess may be far off
                factor = controls.safety * ratio ** (-exponent) if math.isfinite(ratio) else lower
                h = on_ladder(step * min(max(factor, lower), controls.safety))
                rejected_last = True
        results.append(x)
    return results
