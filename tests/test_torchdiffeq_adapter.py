"""The torchdiffeq front end: registration, options, time reversal, grids, autograd, and clear errors."""

import math

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

import deis_ode
from deis_ode import SemiLinearODE
from deis_ode.verify import count_evaluations

F64 = torch.float64


def linear_forcing_ode():
    """dx/dt = -x + t: x(t) = t - 1 + (x0 + 1) e^{-t}; N = t is a degree-1 polynomial."""
    return SemiLinearODE(-1.0, lambda t, x: t * torch.ones_like(x))


def exact(t, x0):
    return t - 1 + (x0 + 1) * torch.exp(-t)


def smooth_ode():
    lin = torch.tensor([-1.0, 0.5, -3.0], dtype=F64)
    return SemiLinearODE(lin, lambda t, x: torch.sin(t + x) - 0.2 * x.roll(1, -1))


def test_methods_are_registered_and_registration_is_idempotent():
    for k in range(1, 6):
        assert SOLVERS[f"deis{k}"] is deis_ode.METHODS[f"deis{k}"]
    assert deis_ode.register() == list(deis_ode.METHODS)
    assert {f"deis{k}" for k in range(1, 6)} <= set(deis_ode.METHODS)
    assert SOLVERS["dopri5"].__module__.startswith("torchdiffeq")


def test_registration_never_overwrites_a_foreign_method():
    foreign = SOLVERS["rk4"]
    SOLVERS["deis2"] = foreign
    try:
        assert "deis2" not in deis_ode.register()
        assert SOLVERS["deis2"] is foreign
    finally:
        SOLVERS["deis2"] = deis_ode.METHODS["deis2"]


def test_same_object_runs_with_dopri5_rk4_and_deis():
    ode, x0 = smooth_ode(), torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    t = torch.linspace(0, 1, 33, dtype=F64)
    ref = torchdiffeq.odeint(ode, x0, t, method="dopri5", rtol=1e-12, atol=1e-12)
    rk4 = torchdiffeq.odeint(ode, x0, t, method="rk4")
    deis = torchdiffeq.odeint(ode, x0, t, method="deis3")
    assert deis.shape == ref.shape == rk4.shape == (33, 3)
    assert (deis - ref).abs().max() < 1e-4
    assert (rk4 - ref).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["deis2", "deis3", "deis4", "deis5"])
def test_decreasing_time_is_honoured(method):
    """Backward in time through torchdiffeq's reversal wrapper: exact for N = t (degree 1 < K)."""
    ode, x0 = linear_forcing_ode(), torch.tensor([2.0], dtype=F64)
    t = torch.linspace(1.5, 0.2, 9, dtype=F64)
    xs = torchdiffeq.odeint(ode, exact(t[0], x0), t, method=method)
    assert torch.allclose(xs[:, 0], exact(t, x0)[..., None][:, 0], rtol=1e-12, atol=1e-13)


def test_one_evaluation_per_step_after_warmup_and_none_on_the_last_step():
    ode, x0 = smooth_ode(), torch.ones(3, dtype=F64)
    t = torch.linspace(0, 1, 21, dtype=F64)
    for k in range(1, 6):
        with count_evaluations(ode) as lower:
            torchdiffeq.odeint(ode, x0, t, method=f"deis{k}", options={"warmup": "lower_order"})
        with count_evaluations(ode) as full:
            torchdiffeq.odeint(ode, x0, t, method=f"deis{k}", options={"warmup": "full_order"})
        assert lower.count == 20
        assert full.count == 20 + (k - 1) ** 2  # K-1 block steps, K-1 sweeps


def test_step_size_hits_every_requested_time():
    ode, x0 = linear_forcing_ode(), torch.tensor([0.5], dtype=F64)
    t = torch.tensor([0.0, 0.33, 1.0, 1.05], dtype=F64)
    with count_evaluations(ode) as counter:
        xs = torchdiffeq.odeint(ode, x0, t, method="deis2", options={"step_size": 0.1})
    # intervals of 0.33, 0.67, 0.05 -> 4 + 7 + 1 steps, +1 for the full-order warm-up
    assert counter.count == 12 + 1
    assert torch.allclose(xs[:, 0], exact(t, x0), rtol=1e-12, atol=1e-13)


def test_grid_constructor_is_merged_with_requested_times():
    ode, x0 = linear_forcing_ode(), torch.tensor([0.5], dtype=F64)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=F64)
    xs = torchdiffeq.odeint(
        ode, x0, t, method="deis3", options={"grid_constructor": lambda f, y0, tt: torch.linspace(0, 1, 11)}
    )
    assert torch.allclose(xs[:, 0], exact(t, x0), rtol=1e-12, atol=1e-13)


def test_float32_state_stays_float32_and_matches_float64():
    ode = smooth_ode()
    t = torch.linspace(0, 1, 17, dtype=F64)
    x64 = torchdiffeq.odeint(ode, torch.ones(3, dtype=F64), t, method="deis3")
    x32 = torchdiffeq.odeint(ode, torch.ones(3, dtype=torch.float32), t, method="deis3")
    assert x32.dtype == torch.float32
    assert (x32.double() - x64).abs().max() < 1e-5


def test_complex_linear_part_with_complex_state():
    """dx/dt = i w x + e^{i w t}: x(t) = (x0 + t) e^{i w t}."""
    w = 3.0
    ode = SemiLinearODE(torch.tensor(1j * w), lambda t, x: torch.exp(1j * w * t) * torch.ones_like(x))
    x0 = torch.tensor([0.5 + 0.2j], dtype=torch.complex128)
    errors = []
    for n in (40, 80, 160):
        t = torch.linspace(0, 2, n + 1, dtype=F64)
        xs = torchdiffeq.odeint(ode, x0, t, method="deis3")
        errors.append(((xs - (x0 + t[:, None]) * torch.exp(1j * w * t[:, None])).abs().max()).item())
    assert xs.dtype == torch.complex128
    assert 2.8 < math.log2(errors[0] / errors[1]) < 3.2 and 2.8 < math.log2(errors[1] / errors[2]) < 3.2


def test_autograd_through_the_solve_matches_finite_differences():
    lin = torch.tensor([-1.0, -0.3], dtype=F64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    ode = SemiLinearODE(lin, lambda t, x: scale * torch.sin(x + t))
    x0 = torch.tensor([0.4, -1.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 11, dtype=F64)

    def loss(lin_, scale_, x0_):
        ode_ = SemiLinearODE(lin_, lambda tt, x: scale_ * torch.sin(x + tt))
        return torchdiffeq.odeint(ode_, x0_, t, method="deis3")[-1].pow(2).sum()

    grads = torch.autograd.grad(loss(lin, scale, x0), (lin, scale, x0))
    eps = 1e-6
    for i, arg in enumerate((lin, scale, x0)):
        for idx in range(arg.numel()):
            bump = torch.zeros_like(arg).view(-1)
            bump[idx] = eps
            bump = bump.view_as(arg)
            args_up = [a.detach() + (bump if j == i else 0) for j, a in enumerate((lin, scale, x0))]
            args_dn = [a.detach() - (bump if j == i else 0) for j, a in enumerate((lin, scale, x0))]
            fd = (loss(*args_up) - loss(*args_dn)) / (2 * eps)
            assert grads[i].reshape(-1)[idx].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    del ode


def test_no_grad_solve():
    ode, x0 = smooth_ode(), torch.ones(3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        xs = torchdiffeq.odeint(ode, x0, torch.linspace(0, 1, 5, dtype=F64), method="deis2")
    assert not xs.requires_grad


def test_odeint_adjoint_forward_works_and_backward_names_adjoint_method():
    lin = torch.tensor([-1.0, -0.3], dtype=F64)
    net = torch.nn.Linear(2, 2).double()
    ode = SemiLinearODE(lin, lambda t, x: torch.tanh(net(x)))
    ode.net = net  # register the parameters for the adjoint
    x0 = torch.tensor([0.4, -1.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 41, dtype=F64)
    out = torchdiffeq.odeint_adjoint(ode, x0, t, method="deis3")
    with pytest.raises(TypeError, match="adjoint_method"):
        out[-1].sum().backward()
    x0.grad = None
    out = torchdiffeq.odeint_adjoint(ode, x0, t, method="deis3", adjoint_method="dopri5", adjoint_options={})
    out[-1].sum().backward()
    direct = torch.autograd.grad(torchdiffeq.odeint(ode, x0, t, method="deis3")[-1].sum(), x0)[0]
    assert torch.allclose(x0.grad, direct, rtol=1e-4)


def test_callback_step_sees_every_step():
    class Recording(SemiLinearODE):
        def __init__(self):
            super().__init__(-1.0, lambda t, x: torch.cos(t) * torch.ones_like(x))
            self.seen = []

        def callback_step(self, t0, y0, dt):
            self.seen.append((t0.item(), dt.item()))

    ode = Recording()
    t = torch.linspace(1.0, 0.0, 6, dtype=F64)
    torchdiffeq.odeint(ode, torch.ones(1, dtype=F64), t, method="deis3")
    assert [round(s[0], 12) for s in ode.seen] == [round(v, 12) for v in t[:-1].tolist()]
    assert all(abs(dt - 0.2) < 1e-12 for _, dt in ode.seen)  # torchdiffeq passes the solver-time step


# --- bad input: clear errors at the boundary -------------------------------------------------------


def test_plain_function_is_rejected_with_a_clear_message():
    with pytest.raises(TypeError, match="SemiLinearODE"):
        torchdiffeq.odeint(lambda t, x: -x, torch.ones(2), torch.linspace(0, 1, 3), method="deis2")


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="unknown option.*'order'"):
        torchdiffeq.odeint(smooth_ode(), torch.ones(3), torch.linspace(0, 1, 3), method="deis2", options={"order": 2})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"basis": "rho"}, "basis must be one of"),
        ({"warmup": "fast"}, "warmup must be one of"),
        ({"step_size": -0.1}, "step_size must be a positive"),
        ({"step_size": 0.1, "grid_constructor": lambda f, y, t: t}, "mutually exclusive"),
        ({"lower_order_final": "yes"}, "lower_order_final must be a bool"),
    ],
)
def test_invalid_option_values_raise(options, match):
    with pytest.raises(ValueError, match=match):
        torchdiffeq.odeint(smooth_ode(), torch.ones(3), torch.linspace(0, 1, 3), method="deis2", options=options)


@pytest.mark.parametrize("t", [[0.0, 0.5, 0.4, 1.0], [0.0, 0.5, 0.5, 1.0], [1.0, 0.5, 0.5, 0.0]])
def test_non_monotone_or_repeated_times_raise(t):
    # torchdiffeq checks t itself (AssertionError); our own check covers grids from grid_constructor
    with pytest.raises((AssertionError, ValueError), match="strictly"):
        torchdiffeq.odeint(smooth_ode(), torch.ones(3), torch.tensor(t), method="deis2")


def test_bad_grid_from_grid_constructor_raises():
    bad = lambda f, y0, t: torch.tensor([0.0, 0.6, 0.3, 1.0])  # noqa: E731
    with pytest.raises(ValueError, match="strictly monotone"):
        torchdiffeq.odeint(
            smooth_ode(), torch.ones(3), torch.tensor([0.0, 1.0]), method="deis2", options={"grid_constructor": bad}
        )


def test_nan_from_the_nonlinear_part_names_step_and_time():
    ode = SemiLinearODE(-1.0, lambda t, x: torch.where(t > 0.5, torch.full_like(x, float("nan")), x))
    with pytest.raises(FloatingPointError, match=r"grid step 3 \(t = 0\.6"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.linspace(0, 1, 6, dtype=F64), method="deis1")


def test_complex_linear_part_with_real_state_raises():
    ode = SemiLinearODE(torch.tensor([1j, -1.0]), lambda t, x: x)
    with pytest.raises(ValueError, match="complex"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.linspace(0, 1, 3, dtype=F64), method="deis2")


def test_linear_part_of_the_wrong_shape_raises():
    ode = SemiLinearODE(torch.tensor([-1.0, -2.0, -3.0]), lambda t, x: x)
    with pytest.raises(ValueError, match="does not broadcast"):
        torchdiffeq.odeint(ode, torch.ones(2), torch.linspace(0, 1, 3), method="deis2")


def test_full_order_warmup_needs_enough_steps():
    with pytest.raises(ValueError, match="at least 3 steps"):
        torchdiffeq.odeint(smooth_ode(), torch.ones(3), torch.linspace(0, 1, 3), method="deis4")
    # the lower-order warm-up runs on any grid
    out = torchdiffeq.odeint(
        smooth_ode(), torch.ones(3), torch.linspace(0, 1, 3), method="deis4", options={"warmup": "lower_order"}
    )
    assert torch.isfinite(out).all()


def test_wrong_shape_from_the_nonlinear_part_raises():
    ode = SemiLinearODE(-1.0, lambda t, x: x[:1])
    with pytest.raises(ValueError, match="state's shape"):
        torchdiffeq.odeint(ode, torch.ones(2), torch.linspace(0, 1, 3), method="deis1")


def test_tuple_state_is_rejected():
    with pytest.raises(TypeError, match="tuple"):
        torchdiffeq.odeint(smooth_ode(), (torch.ones(3), torch.ones(1)), torch.linspace(0, 1, 3), method="deis1")
