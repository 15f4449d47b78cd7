"""Command-line behaviour a new user meets first (issue 15), each through the CLI."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import planted_mlp

import condense_graph
from condense_graph.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), path)
    return path


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"condense-graph {condense_graph.__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "condense_graph", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert "exit codes: 0 success, 1 verification failed, 2 user error, 3 internal error" in done.stdout
    assert "condense-graph reduce model.onnx small.onnx --data calib.npz --max-error" in done.stdout


@pytest.mark.parametrize("command", ["reduce", "inspect", "verify", "bench"])
def test_every_subcommand_takes_debug_and_quiet(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--debug" in text and "--quiet" in text


def test_inspect_quiet_prints_nothing_but_writes_json(model_path, tmp_path, capsys):
    listing = tmp_path / "i.json"
    assert main(["inspect", str(model_path), "--quiet", "--json", str(listing)]) == 0
    assert capsys.readouterr().out == ""
    assert [layer["width"] for layer in json.loads(listing.read_text())["layers"]] == [12, 10]


def test_plot_without_matplotlib_fails_before_any_work(model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "small.onnx"
    assert main(["reduce", str(model_path), str(out), "--plot", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install -c constraints.txt '.[plot]'" in err
    assert not out.exists()  # refused before the reduction, nothing written


def test_nothing_reduced_says_so_with_a_hint(tmp_path, capsys):
    path = tmp_path / "distinct.onnx"
    onnx.save(planted_mlp([5, 8, 3], [8], seed=1), path)  # every neuron its own direction
    assert main(["reduce", str(path), str(tmp_path / "o.onnx"), "--threshold", "0.999"]) == 0
    text = capsys.readouterr().out
    assert "Nothing was reduced at threshold 0.999" in text
    assert "condense-graph inspect" in text and "--target-params" in text and "--data" in text


def test_bench_after_a_failed_verify_says_it_was_skipped(model_path, tmp_path, capsys):
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    args = ["reduce", str(model_path), str(out), "--threshold", "0.5", "--verify", "--bench"]
    assert main([*args, "--report", str(report), "--runs", "2"]) == 1
    text = capsys.readouterr().out
    assert "Bench: skipped (verification failed" in text
    assert json.loads(report.read_text())["bench_skipped"].startswith("verification failed")


def test_a_layer_width_above_the_layers_is_an_error(model_path, tmp_path, capsys):
    args = ["reduce", str(model_path), str(tmp_path / "o.onnx"), "--layer-width", "fc1=40"]
    assert main(args) == 2
    assert "width 40 for layer 'fc1' (--layer-width) is above its width 12" in capsys.readouterr().err


def test_data_that_does_not_fit_the_input_is_caught_before_onnx_runtime(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((40, 4), np.float32))  # the model takes [N, 5]
    assert main(["reduce", str(model_path), str(tmp_path / "o.onnx"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"array 'x' in {data} has shape (40, 4); graph input 'x' expects [N, 5]" in err
    with pytest.raises(condense_graph.CondenseError, match=r"has shape \(40, 4\); graph input 'x' expects"):
        condense_graph.condense(str(model_path), calibration={"x": np.zeros((40, 4), np.float32)})


def test_labels_must_be_class_indices(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((20, 5), np.float32), y=np.zeros((20, 3)))
    assert main(["verify", str(model_path), str(model_path), "--data", str(data), "--labels", "y"]) == 2
    assert "labels must be 1-D class indices; got shape (20, 3)" in capsys.readouterr().err


def test_input_shapes_takes_several_values_and_brackets(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(planted_mlp([5, 12, 3], [4], seed=3, batch="N"), path)
    report = tmp_path / "b.json"
    args = ["bench", str(path), "--input-shapes", "x:[7,5]", "--runs", "2", "--warmup", "0"]
    assert main([*args, "--report", str(report), "--quiet"]) == 0
    assert main(["verify", str(path), str(path), "--input-shapes", "x:[3,5]", "--quiet"]) == 0
    assert main(["verify", str(path), str(path), "--input-shapes", "x:3,5", "q:[1,2]"]) == 2
    assert "--input-shape names no graph input: q" in capsys.readouterr().err


def test_verify_batch_size_on_a_fixed_batch_model_says_it_is_not_used(tmp_path, capsys):
    path, data = tmp_path / "fixed.onnx", tmp_path / "d.npz"
    onnx.save(planted_mlp([5, 12, 3], [4], seed=3, batch=4), path)
    np.savez(data, x=np.zeros((8, 5), np.float32))
    assert main(["verify", str(path), str(path), "--data", str(data), "--batch-size", "3", "--quiet"]) == 0
    assert "the model takes batches of 4; --batch-size 3 is not used" in capsys.readouterr().err


def test_inspect_names_each_layers_weight(model_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[1]
    assert "| Layer" in header and "| Weight" in header
    assert "fc1.weight" in text and "fc2.weight" in text


def test_bench_prints_the_shapes_fed_and_sizes_in_kib(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save(planted_mlp([23, 64, 23], [8], seed=3, batch="N"), path)
    report = tmp_path / "b.json"
    args = ["bench", str(path), "--input-shape", "x:64,23", "--runs", "2", "--warmup", "0"]
    assert main([*args, "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "(inputs x 64x23;" in text and " KiB" in text
    assert json.loads(report.read_text())["inputs"] == {"x": [64, 23]}


def test_long_work_shows_lines_off_a_terminal_and_nothing_with_quiet(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32))
    args = ["reduce", str(model_path), str(tmp_path / "o.onnx"), "--data", str(data), "--max-error", "0.05"]
    assert main(args) == 0
    err = capsys.readouterr().err  # pytest's stderr is not a terminal: plain lines
    assert "--max-error step 1: widths" in err and "condensing layers: " in err and "\r" not in err
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_verbose_prints_one_progress_line_per_layer(tmp_path, capsys):
    from builders import planted_mlp as mlp

    path = tmp_path / "deep.onnx"
    onnx.save(
        mlp([5, 12, 10, 9, 8, 7, 6, 5, 4, 6, 7, 8, 9, 3], [4, 6, 5, 4, 4, 3, 3, 2, 2, 3, 4, 5], seed=1), path
    )
    out = tmp_path / "small.onnx"
    assert main(["reduce", str(path), str(out), "--threshold", "1.0"]) == 0
    default = [line for line in capsys.readouterr().err.splitlines() if line.startswith("condensing layers")]
    assert main(["reduce", str(path), str(out), "--threshold", "1.0", "-v"]) == 0
    verbose = [line for line in capsys.readouterr().err.splitlines() if line.startswith("condensing layers")]
    steps = int(verbose[-1].split(": ")[1].split("/")[1].split()[0])
    assert steps > 10 and len(verbose) == steps and len(default) < steps
