"""--plot writes decodable PNGs; everything else works without matplotlib; progress on TTYs only."""

import io
import sys

import onnx
import pytest
from builders import planted_mlp

from condense_graph.cli import main
from condense_graph.progress import Progress


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(planted_mlp([6, 24, 16, 3], [5, 4]), path)
    return path


def test_plot_writes_heatmaps_and_width_chart(model_path, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    plots = tmp_path / "plots"
    assert (
        main(
            [
                "reduce",
                str(model_path),
                str(tmp_path / "o.onnx"),
                "--threshold",
                "0.9999",
                "--plot",
                str(plots),
                "--quiet",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["cosine_fc1.png", "cosine_fc2.png", "widths.png"]
    for path in plots.iterdir():
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200


def test_without_matplotlib_only_plot_fails_cleanly(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "o.onnx"
    assert main(["reduce", str(model_path), str(out), "--threshold", "0.9999", "--quiet"]) == 0
    assert out.exists()
    assert main(["reduce", str(model_path), str(out), "--plot", str(tmp_path / "p"), "--quiet"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_terminal_and_prints_lines_elsewhere():
    tty, pipe = FakeTerminal(), io.StringIO()
    for stream in (tty, pipe):
        with Progress(4, "work", stream=stream) as bar:
            for _ in range(4):
                bar.advance()
    assert "4/4" in tty.getvalue() and "\r" in tty.getvalue()
    lines = pipe.getvalue().splitlines()  # a log: one plain line per step, no carriage returns
    assert [line.split(" (")[0] for line in lines] == ["work: 1/4", "work: 2/4", "work: 3/4", "work: 4/4"]
    assert "\r" not in pipe.getvalue()
    many = io.StringIO()
    with Progress(500, "runs", stream=many) as bar:
        for _ in range(500):
            bar.advance()
    assert 10 <= len(many.getvalue().splitlines()) <= 12  # about LINES, not 500
    quiet = FakeTerminal()
    Progress(2, "x", enabled=False, stream=quiet).advance()
    assert quiet.getvalue() == ""
