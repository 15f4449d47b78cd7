"""The command line: every command and option, exit codes, and the JSON report keys."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import planted_mlp, run
from conftest import check_full, message_lines

from condense_graph.cli import main

REPORT_KEYS = {"params_before", "params_after", "layers", "skipped"}
LAYER_KEYS = {"name", "width_before", "width_after", "threshold", "exact"}


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), path)
    return path


def test_reduce_writes_model_table_and_report(model_path, tmp_path, capsys):
    out, report_path = tmp_path / "small.onnx", tmp_path / "report.json"
    before = model_path.read_bytes()
    code = main(["reduce", str(model_path), str(out), "--threshold", "0.9999", "--report", str(report_path)])
    assert code == 0
    assert model_path.read_bytes() == before
    check_full(onnx.load(out))
    report = json.loads(report_path.read_text())
    assert REPORT_KEYS <= set(report)
    assert all(LAYER_KEYS <= set(layer) for layer in report["layers"])
    assert [layer["width_after"] for layer in report["layers"]] == [4, 6]
    assert report["skipped"][0]["name"] == "fc3" and report["skipped"][0]["reason"]
    table = capsys.readouterr().out
    assert "12 -> 4" in table and "10 -> 6" in table and "Params" in table and "File size" in table


def test_layer_thresholds_apply_per_layer(model_path, tmp_path):
    report_path = tmp_path / "r.json"
    code = main(
        [
            "reduce",
            str(model_path),
            str(tmp_path / "o.onnx"),
            "--threshold",
            "0.9999",
            "--layer",
            "fc2=1.0",
            "--layer",
            "fc1.weight=0.9999",
            "--report",
            str(report_path),
        ]
    )
    assert code == 0
    layers = json.loads(report_path.read_text())["layers"]
    assert [(layer["threshold"], layer["width_after"]) for layer in layers] == [
        (0.9999, 4),
        (1.0, 6),
    ]  # 1.0 still merges exact multiples


def test_verify_passes_and_reports_errors(model_path, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    code = main(
        [
            "reduce",
            str(model_path),
            str(tmp_path / "o.onnx"),
            "--threshold",
            "0.9999",
            "--verify",
            "--atol",
            "1e-2",
            "--input-shape",
            "x:7,5",
            "--report",
            str(report_path),
        ]
    )
    verify = json.loads(report_path.read_text())["verify"]
    assert code == 0
    assert 0.0 <= verify["max_rel_err"] < 1e-5 and verify["max_abs_err"] <= 1e-2
    assert "PASS" in capsys.readouterr().out


def test_failed_verification_writes_nothing_and_exits_1(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code = main(["reduce", str(model_path), str(out), "--threshold", "0.0", "--verify", "--atol", "1e-6"])
    assert code == 1 and not out.exists()
    assert "FAIL" in capsys.readouterr().out
    code = main(
        ["reduce", str(model_path), str(out), "--threshold", "0.0", "--verify", "--atol", "1e-6", "--force"]
    )
    assert code == 1 and out.exists()


def test_inspect_lists_widths_at_standard_thresholds(model_path, tmp_path, capsys):
    json_path = tmp_path / "i.json"
    assert main(["inspect", str(model_path), "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    for t in ("@0.8", "@0.9", "@0.95", "@0.99", "@0.999"):
        assert t in out
    info = json.loads(json_path.read_text())
    assert [layer["widths"]["0.999"] for layer in info["layers"]] == [4, 6]
    assert [layer["width"] for layer in info["layers"]] == [12, 10]
    assert "fc3" in out and "graph output" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["reduce", "missing.onnx", "o.onnx"], "no such file"),
        (["reduce", "{model}", "o.onnx", "--threshold", "2"], "between -1 and 1"),
        (["reduce", "{model}", "o.onnx", "--layer", "nope=0.9"], "no reducible layer named 'nope'"),
        (["reduce", "{model}", "o.onnx", "--layer", "fc3=0.9"], "cannot be reduced"),
        (["reduce", "{model}", "o.onnx", "--layer", "fc1"], "bad --layer"),
        (["reduce", "{model}", "o.onnx", "--verify", "--input-shape", "x:a,b"], "bad --input-shape"),
        (["reduce", "{model}", "o.onnx", "--verify", "--input-shape", "y:1,5"], "names no graph input"),
        (["reduce", "{model}", "{model}"], "--in-place"),
        (["inspect", "{garbage}"], "not a readable ONNX model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model")
    before = model_path.read_bytes()
    argv = [a.format(model=model_path, garbage=garbage) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(message_lines(err)) == 1
    assert model_path.read_bytes() == before


def test_in_place_overwrites_only_when_asked(model_path):
    assert (
        main(["reduce", str(model_path), str(model_path), "--threshold", "0.9999", "--in-place", "--quiet"])
        == 0
    )
    assert [d.dims for d in onnx.load(model_path).graph.initializer][0] == [4, 5]


def test_console_script_runs(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "condense_graph.cli", "reduce", str(model_path), str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == "" and out.exists()
    x = np.ones((2, 5), np.float32)
    assert run(onnx.load(out), {"x": x})[0].shape == (2, 3)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "reduce", str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")])
