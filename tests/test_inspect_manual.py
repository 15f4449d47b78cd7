"""The paper's manual mode (section 2.4.1, issue 14): `inspect --thresholds` lists each layer's width
at the thresholds a person asks for, and `inspect --plot DIR` draws them, so per-layer thresholds
can be picked for `reduce --layer NAME=T`."""

import json
import sys

import onnx
import pytest
from builders import planted_mlp

from condense_graph.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), path)
    return path


def test_thresholds_choose_the_columns_and_the_widths(model_path, tmp_path, capsys):
    listing = tmp_path / "i.json"
    assert main(["inspect", str(model_path), "--thresholds", "0.5,1.0", "--json", str(listing)]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "Layer" in line)
    assert "@0.5" in header and "@1" in header and "@0.9" not in header
    info = json.loads(listing.read_text())
    assert info["thresholds"] == [0.5, 1.0]
    for layer in info["layers"]:  # the planted copies merge at 1.0; a lower threshold merges more
        assert set(layer["widths"]) == {"0.5", "1.0"}
        assert layer["widths"]["0.5"] <= layer["widths"]["1.0"] < layer["width"]
    # the widths listed are what reduce gives at that threshold
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    assert (
        main(["reduce", str(model_path), str(out), "--threshold", "1.0", "--quiet", "--report", str(report)])
        == 0
    )
    reduced = {layer["name"]: layer["width_after"] for layer in json.loads(report.read_text())["layers"]}
    assert reduced == {layer["name"]: layer["widths"]["1.0"] for layer in info["layers"]}


@pytest.mark.parametrize("spec", ["0.9,abc", "", "1.5", "0.9,,-2"])
def test_bad_thresholds_are_one_line_and_exit_2(model_path, spec, capsys):
    assert main(["inspect", str(model_path), "--thresholds", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--thresholds takes comma-separated cosines in [-1, 1]" in err[0]


def test_plot_draws_the_widths_at_each_threshold(model_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "plots"
    assert main(["inspect", str(model_path), "--thresholds", "0.8,0.9,1.0", "--plot", str(folder)]) == 0
    picture = folder / "thresholds.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000
    assert f"Plot: {picture}" in capsys.readouterr().out


def test_plot_without_matplotlib_fails_before_any_work(model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    listing = tmp_path / "i.json"
    assert main(["inspect", str(model_path), "--plot", str(tmp_path / "p"), "--json", str(listing)]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not listing.exists()
