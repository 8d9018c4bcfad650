"""The scripts in examples/: each runs with --quick and prints sane numbers."""

from __future__ import annotations

import re

import pytest
from _subprocess import ROOT, run_python


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    result = run_python(str(ROOT / "examples" / name), *args, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows under the dashed line of a printed table, keyed by their first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) == {"-"})
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_flow_matching_quick(tmp_path):
    plot = tmp_path / "flow.png"
    args = ["--quick"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot = None
    else:
        args += ["--plot", str(plot)]
    out = run_example("flow_matching.py", *args)
    rows = table_rows(out)
    errors = {steps: [float(e) for e in rows[steps][:4]] for steps in ("5", "10", "20")}
    deis1, deis2, deis3, euler = zip(*(errors[s] for s in ("5", "10", "20")), strict=True)
    assert rows["20"][0] == rows["20"][3]  # deis1 on the x0 split is Euler for straight paths
    assert deis3[-1] < 0.02 and deis3[-1] < deis2[-1] < deis1[-1]
    assert all(a > b for a, b in zip(deis1, deis1[1:], strict=False))  # converges
    slopes = [float(s) for s in rows["order"][:4]]
    assert slopes[0] == pytest.approx(1.0, abs=0.1) and slopes[2] > 2.5
    summary = re.search(r"deis3 with 20 velocity evaluations: median error (\S+)", out)
    assert summary and float(summary.group(1)) == pytest.approx(deis3[-1], rel=1e-3)
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def sample_quality(out: str) -> dict[str, tuple[float, float]]:
    rows = table_rows(out)
    return {name: (float(cells[-2]), float(cells[-1])) for name, cells in rows.items()}


def test_train_2d_mlp_quick():
    out = run_example("train_2d_mlp.py", "--quick")
    assert re.search(r"trained 1000 steps in [\d.]+ s, final loss [\d.]+", out)
    quality = sample_quality(out)
    noise_distance, noise_near = quality["x_T (noise)"]
    data_distance, data_near = quality["training data"]
    assert data_near > 0.95 and noise_near < 0.1
    for sampler in ("deis3", "deis1 (DDIM)", "euler", "scipy 1e-6"):
        distance, near = quality[sampler]
        # even a short training run moves the samples well towards the modes
        assert data_distance < distance < 0.7 * noise_distance, sampler
        assert near > 3 * noise_near, sampler


@pytest.mark.slow
def test_train_2d_mlp_full(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "ring.png"
    out = run_example("train_2d_mlp.py", "--plot", str(plot), timeout=600)
    quality = sample_quality(out)
    distance, near = quality["deis3"]
    # measured: deis3 0.164 / 0.891, DDIM 0.172 / 0.856, Euler 0.197 / 0.804, scipy at 1e-6 0.142 / 0.924 (the
    # ODE's own samples); the bounds sit between deis3 and Euler, so plain Euler at 10 steps does not meet them
    assert distance < 0.18 and near > 0.85
    euler_distance, euler_near = quality["euler"]
    assert distance < euler_distance and near > euler_near
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
