"""The stiff-PDE examples (``examples/``) and the stiff benchmark's bookkeeping.

Each example runs in its quick mode as a script, and what it prints is checked against physics or an independent
solver: KS agrees with scipy's Radau, Allen-Cahn's free energy never increases, NLS conserves mass and reproduces
the exact soliton, Gray-Scott stays in the invariant region and agrees with scipy's LSODA (on a coarser grid).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchdiffeq
from _subprocess import ROOT, run_python
from scipy.integrate import solve_ivp

import deis_ode  # noqa: F401

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from _spectral import PackedSystem, relative_error, unpack  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_example(name: str, *args: str) -> str:
    proc = run_python(str(EXAMPLES / name), "--quick", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def plot_args(tmp_path: Path) -> tuple[list[str], Path | None]:
    if not HAS_MATPLOTLIB:
        return [], None
    path = tmp_path / "plot.png"
    return ["--plot", str(path)], path


def check_plot(path: Path | None) -> None:
    if path is not None:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- Kuramoto-Sivashinsky


def test_kuramoto_sivashinsky_agrees_with_scipy(tmp_path: Path) -> None:
    extra, png = plot_args(tmp_path)
    out = run_example("kuramoto_sivashinsky.py", *extra)
    # deis4 with steps of 1/8 against Radau at rtol 1e-10 at t = 10
    assert number(r"relative difference from scipy Radau \(rtol 1e-10\) at t = 10: (\S+)", out) < 1e-4
    assert number(r"max \|u\| = (\S+)", out) < 5.0  # the chaotic attractor stays bounded
    check_plot(png)


def test_kuramoto_sivashinsky_jacobian_and_order() -> None:
    import kuramoto_sivashinsky

    problem = kuramoto_sivashinsky.make_problem(t_end=2.0)
    system = PackedSystem(problem)
    y = system.y0 + 0.01 * np.random.default_rng(0).standard_normal(system.y0.size)
    eye = np.eye(y.size)
    fd = np.stack([(system.rhs(0, y + 1e-6 * e) - system.rhs(0, y - 1e-6 * e)) / 2e-6 for e in eye], axis=1)
    assert np.abs(problem.dense_jacobian(0.0, y) - fd).max() < 1e-6 * np.abs(fd).max()

    ref = kuramoto_sivashinsky.scipy_reference(problem, 2.0, rtol=1e-12)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    errors = [
        relative_error(
            problem,
            torchdiffeq.odeint(problem.ode, problem.x0, t, method="deis4", options={"step_size": 2 / m})[-1],
            ref,
        )
        for m in (20, 40)
    ]
    assert errors[1] < 1e-6
    assert math.log2(errors[0] / errors[1]) > 3.5  # fourth order


# ------------------------------------------------------------------------------------------------------ Allen-Cahn


def test_allen_cahn_energy_decreases(tmp_path: Path) -> None:
    extra, png = plot_args(tmp_path)
    out = run_example("allen_cahn.py", *extra)
    assert "max |L| = 1.05e+04" in out
    assert number(r"largest energy increase between outputs: \S+ \(relative (\S+)\)", out) < 1e-12
    energies = [float(v) for v in re.findall(r"energy ([0-9.]+) ", out)]
    assert energies[-1] < 0.6 * energies[0]
    assert number(r"max \|u\| = (\S+)", out) <= 1.0 + 1e-6  # maximum principle: |u0| < 1 stays below 1
    check_plot(png)


def test_allen_cahn_agrees_with_scipy_bdf() -> None:
    import allen_cahn

    problem = allen_cahn.make_problem(t_end=2.0)
    system = PackedSystem(problem)
    sol = solve_ivp(system.rhs, (0.0, 2.0), system.y0, method="BDF", rtol=1e-10, atol=1e-8,
                    jac=system.sparse_linear_jacobian())  # fmt: skip
    ref = torch.from_numpy(unpack(sol.y[:, -1], system.shape).copy())
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    ours = torchdiffeq.odeint(problem.ode, problem.x0, t, method="deis4", options={"step_size": 0.01})[-1]
    assert relative_error(problem, ours, ref) < 1e-7


# ------------------------------------------------------------------------------------------------------------- NLS


def test_nls_conserves_mass_and_matches_the_soliton(tmp_path: Path) -> None:
    extra, png = plot_args(tmp_path)
    out = run_example("nls.py", *extra)
    assert number(r"max \|u - sech\(x\) exp\(it/2\)\| = (\S+)", out) < 1e-7
    assert number(r"largest relative drift (\S+)", out) < 1e-6
    assert abs(number(r"peak \|u\| = (\S+)", out) - 4.0) < 1e-3  # the breather focuses to height 4
    assert number(r"max \| \|u\(t_end\)\| - \|u\(0\)\| \| = (\S+)", out) < 1e-5  # and returns after a period
    check_plot(png)


def test_nls_packed_jacobian_is_the_rotation() -> None:
    import nls

    problem = nls.make_problem(n=16)
    system = PackedSystem(problem)
    dense = system.sparse_linear_jacobian().toarray()
    y = np.random.default_rng(1).standard_normal(system.y0.size)
    v = unpack(y, system.shape)
    np.testing.assert_allclose(unpack(dense @ y, system.shape), problem.linear * v, atol=1e-12)
    bands, jac = system.banded_linear_jacobian()
    assert bands == {"lband": 1, "uband": 1}
    band = jac(0.0, y)
    for i in range(y.size):  # LSODA's storage: band[uband + i - j, j] = J[i, j]
        for j in range(max(0, i - 1), min(y.size, i + 2)):
            assert band[1 + i - j, j] == dense[i, j]


# ----------------------------------------------------------------------------------------------------- Gray-Scott


def test_gray_scott_runs_and_stays_in_range(tmp_path: Path) -> None:
    extra, png = plot_args(tmp_path)
    out = run_example("gray_scott.py", *extra)
    ranges = re.findall(r"u in \[(\S+), (\S+)\]\s+v in \[(\S+), (\S+)\]", out)
    assert len(ranges) == 6
    for bounds in ranges:
        u_min, u_max, v_min, v_max = map(float, bounds)
        assert -1e-4 <= u_min and u_max <= 1 + 1e-4 and -1e-4 <= v_min and v_max <= 1
    assert float(ranges[-1][3]) > 0.3  # the spots have grown
    check_plot(png)


def test_gray_scott_agrees_with_scipy_lsoda_on_a_coarse_grid() -> None:
    import gray_scott

    problem = gray_scott.make_problem(t_end=50.0, n=64)
    system = PackedSystem(problem)
    bands, jac = system.banded_linear_jacobian()
    sol = solve_ivp(system.rhs, (0.0, 50.0), system.y0, method="LSODA", rtol=1e-11, atol=1e-9, jac=jac, **bands)
    ref = torch.from_numpy(unpack(sol.y[:, -1], system.shape).copy())
    t = torch.tensor([0.0, 50.0], dtype=torch.float64)
    ours = torchdiffeq.odeint(problem.ode, problem.x0, t, method="deis4", options={"step_size": 0.25})[-1]
    assert relative_error(problem, ours, ref) < 1e-7


# ------------------------------------------------------------------------------------------------------- benchmark


def _benchmark():
    spec = importlib.util.spec_from_file_location("stiff_benchmark", ROOT / "benchmarks" / "stiff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_time_to_target_interpolates_between_bracketing_points() -> None:
    bench = _benchmark()
    points = [
        bench.Point("m", "a", 100, 1.0, 1e-3),
        bench.Point("m", "b", 1000, 10.0, 1e-7),
        bench.Point("m", "c", 50, 20.0, math.nan, note="capped"),
    ]
    rel, seconds, evaluations, _ = bench.at_target(points, 1e-5)
    assert rel == "="
    assert seconds == pytest.approx(math.sqrt(10.0))  # halfway in log error, so halfway in log time
    assert evaluations == pytest.approx(math.sqrt(1e5))
    assert bench.at_target(points, 1e-2)[:2] == ("<=", 1.0)
    assert bench.at_target(points, 1e-9)[:2] == (">", 20.0)


@pytest.mark.slow
def test_benchmark_quick_run_on_ks(tmp_path: Path) -> None:
    out_file = tmp_path / "stiff.txt"
    proc = run_python(
        str(ROOT / "benchmarks" / "stiff.py"), "--quick", "--problems", "ks", "--out", str(out_file), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out_file.read_text()
    assert "## summary" in text
    assert re.search(r"ks\s+1e-06\s+deis\d", text)


# ------------------------------------------------------------------------------------------------- without matplotlib

_WITHOUT_MATPLOTLIB = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib' (blocked by the test)")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1].rsplit("/", 1)[0])
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("name", ["allen_cahn.py", "gray_scott.py", "kuramoto_sivashinsky.py", "nls.py"])
def test_plot_without_matplotlib_prints_an_install_hint_before_the_run(name: str, tmp_path: Path) -> None:
    proc = run_python(
        "-c", _WITHOUT_MATPLOTLIB, str(EXAMPLES / name), "--quick", "--plot", str(tmp_path / "p.png"), timeout=120
    )
    assert proc.returncode == 1
    assert "--plot needs matplotlib: pip install deis_ode[bench]" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # stopped before the run
