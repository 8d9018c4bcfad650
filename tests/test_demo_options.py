"""``python -m deis_ode demo``: --plot, the progress bars and the callback of run_demo."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from deis_ode.__main__ import Progress, main, run_demo

torch.set_num_threads(1)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_run_demo_callback_and_rows():
    seen = []
    result = run_demo(nfe=10, samples=16, seed=1, disable=True, callback=seen.append)
    assert [info["i"] for info in seen] == list(range(6))
    assert result.rows[1].label.startswith("optimised grid: deis3")
    assert [info["label"] for info in seen] == [row.label for row in result.rows]
    for info, row in zip(seen, result.rows, strict=True):
        assert info["x"] is row.samples and info["x"].shape == (16, 8)
        assert info["median_error"] == row.median_error <= row.max_error
    assert result.reference.shape == (16, 8) and result.rows[0].label.startswith("deis3")


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    assert main(["demo", "--samples", "16", "--no-progress", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert f"plot written to {path}" in out.out and out.err == ""


def test_plot_without_matplotlib_fails_early_with_the_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now raises ImportError
    path = tmp_path / "demo.png"
    assert main(["demo", "--samples", "16", "--plot", str(path)]) == 2
    out = capsys.readouterr()
    assert "pip install deis_ode[bench]" in out.err
    assert out.out == "" and not path.exists()  # nothing was computed


def test_progress_is_off_unless_a_terminal_or_asked():
    stream = io.StringIO()
    with Progress(5, "work", stream=stream) as bar:
        bar.update()
    assert stream.getvalue() == ""
    stream = Terminal()
    with Progress(5, "work", disable=True, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and bar.n == 3


def test_progress_text_fallback_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = Terminal()
    with Progress(4, "work", stream=stream) as bar:
        bar.set_postfix("deis3")
        bar.update()
        assert "work: |" in stream.getvalue() and "1/4 deis3" in stream.getvalue()
        bar.advance_to(100)  # clipped to the total
        bar.advance_to(2)  # never goes back
        assert bar.n == 4 and stream.getvalue().endswith("4/4 deis3")
    assert stream.getvalue().endswith("\r")  # the bar is erased when done


def test_progress_uses_tqdm_when_installed():
    pytest.importorskip("tqdm")
    stream = Terminal()
    with Progress(1000, "scipy reference", stream=stream) as bar:
        bar.advance_to(500.7)
        assert bar.n == 500
    assert "scipy reference" in stream.getvalue()


def test_demo_progress_flag_shows_bars_on_stderr(capsys):
    assert main(["demo", "--samples", "8", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "scipy reference" in err and "methods" in err
