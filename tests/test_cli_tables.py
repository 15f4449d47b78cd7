"""The tables and progress the command line prints (issue 15, "Output that says what happened").

The reduce table's Path column gives each layer's kind (dense / conv / depthwise block / residual
group) and activation, Exact says exact / approx / - (not reduced), Error the per-layer error of
the JSON report (the block error, or with data the refit's calibration error, a footnote says
which). Off a terminal: plain ASCII, no ANSI escape codes, progress as plain lines on stderr, and
nothing there with --quiet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import planted_mlp, x_to_y_model
from conftest import PROGRESS_LINE
from onnx import helper

from condense_graph.cli import main
from condense_graph.report import format_reduce_table, layer_error, path

ANSI = re.compile(r"\x1b\[")
ROOT = Path(__file__).parents[1]


def mixed_net(seed: int = 0) -> onnx.ModelProto:
    """stem conv -> Relu, conv1 -> Relu -> conv2 added to it -> Relu (a residual group of stem and
    conv2), expand 1x1 -> Relu -> depthwise 3x3 -> Relu -> project 1x1 (a depthwise block) -> Relu
    -> pool -> fc1 -> Relu -> fc2. Random weights."""
    rng = np.random.default_rng(seed)
    inits, nodes = {}, []

    def conv(name, x, cin, cout, k, group=1):
        fan_in = cin // group * k * k
        inits[f"{name}.weight"] = rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(fan_in)
        inits[f"{name}.bias"] = rng.normal(size=cout) * 0.1
        inputs = [x, f"{name}.weight", f"{name}.bias"]
        nodes.append(
            helper.make_node(
                "Conv", inputs, [name], name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group
            )
        )
        return name

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [x + "_relu"], name=x + "_relu"))
        return x + "_relu"

    stream = relu(conv("stem", "x", 3, 8, 3))
    branch = conv("conv2", relu(conv("conv1", stream, 8, 8, 3)), 8, 8, 3)
    nodes.append(helper.make_node("Add", [stream, branch], ["sum"], name="add"))
    block = relu(conv("dw", relu(conv("expand", relu("sum"), 8, 12, 1)), 12, 12, 3, group=12))
    head = relu(conv("project", block, 12, 8, 1))
    nodes.append(helper.make_node("GlobalAveragePool", [head], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    for name, fan_in, width, x, out in (("fc1", 8, 10, "flat", "fc1"), ("fc2", 10, 3, "fc1_relu", "y")):
        inits[f"{name}.weight"] = rng.normal(size=(width, fan_in))
        inits[f"{name}.bias"] = rng.normal(size=width) * 0.1
        nodes.append(
            helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1)
        )
        if name == "fc1":
            relu("fc1")
    return x_to_y_model(nodes, inits, ["N", 3, 8, 8], ["N", 3])


def rows(table: str) -> dict[str, dict[str, str]]:
    """The first table in `table`: layer name -> {column header: cell}."""
    first = table.split("\n\n")[0].splitlines()
    first = first[: next((i for i, line in enumerate(first) if line[:1] not in "+|"), len(first))]
    lines = [line for line in first if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header = cells[0]
    return {row[0]: dict(zip(header, row, strict=True)) for row in cells[1:]}


@pytest.fixture
def mixed(tmp_path):
    model, data = tmp_path / "mixed.onnx", tmp_path / "d.npz"
    onnx.save(mixed_net(), model)
    np.savez(data, x=np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32))
    return model, data


def test_path_column_names_the_kind_and_activation(mixed, tmp_path, capsys):
    model, data = mixed
    args = ["reduce", str(model), str(tmp_path / "o.onnx"), "--data", str(data), "--target-params", "0.5"]
    assert main([*args, "--report", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    by_layer = rows(table)
    assert by_layer["fc1"]["Path"] == "dense: Relu"
    assert by_layer["conv1"]["Path"] == "conv: Relu"
    assert by_layer["expand"]["Path"] == "depthwise block: Relu+Conv+Relu"
    assert by_layer["stem"]["Path"] == "residual group: Relu"
    assert "Activation" not in table.splitlines()[1]
    # with data: every reduced layer's error is its refit's calibration error, and the table says so
    report = json.loads((tmp_path / "r.json").read_text())
    for layer in report["layers"]:
        if layer["width_after"] < layer["width_before"]:
            row = by_layer[layer["name"]]
            assert row["Exact"] == "approx"
            refit = [r["calibration_err_refit"] for r in layer["refit"] if r["refit"]]
            assert float(row["Error"]) == pytest.approx(max(refit), rel=1e-2)
    assert "Error: with data, the largest calibration error of a refit consumer" in table


def test_exact_and_error_columns_without_data(tmp_path, capsys):
    planted = tmp_path / "mlp.onnx"
    onnx.save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), planted)
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "reduce",
                str(planted),
                str(tmp_path / "o.onnx"),
                "--threshold",
                "0.9999",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    by_layer = rows(capsys.readouterr().out)
    assert by_layer["fc1"]["Exact"] == by_layer["fc2"]["Exact"] == "exact"
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    for name in ("fc1", "fc2"):
        assert float(by_layer[name]["Error"]) == pytest.approx(
            layers[name]["block_error"]["max_rel_err"], abs=1e-3
        )

    mixed = tmp_path / "mixed.onnx"
    onnx.save(mixed_net(), mixed)
    assert main(["reduce", str(mixed), str(tmp_path / "o2.onnx"), "--threshold", "0.3"]) == 0
    text = capsys.readouterr().out
    by_layer = rows(text)
    kept = [row for row in by_layer.values() if row["Width"].startswith("8 -> 8")]
    assert kept and all(row["Exact"] == "-" and row["Error"] == "-" for row in kept)
    cut = [row for row in by_layer.values() if row["Exact"] == "approx"]
    assert cut and all(float(row["Error"]) >= 0 for row in cut)
    assert "Error: the block error (block_error.max_rel_err" in text


def test_error_prefers_the_refit_and_says_so():
    layer = {
        "name": "fc1",
        "op": "Gemm",
        "activation": "Tanh",
        "width_before": 8,
        "width_after": 4,
        "threshold": None,
        "exact": False,
        "min_group_cosine": None,
        "block_error": {"max_abs_err": 1.0, "max_rel_err": 0.5},
        "refit": [
            {"consumer": "a", "refit": True, "calibration_err_paper": 0.3, "calibration_err_refit": 0.02},
            {"consumer": "b", "refit": False},
            {"consumer": "c", "refit": True, "calibration_err_paper": 0.3, "calibration_err_refit": 0.04},
        ],
    }
    assert layer_error(layer) == ("0.04", "refit")
    assert layer_error(layer | {"refit": [{"consumer": "b", "refit": False}]}) == ("0.5", "block")
    assert layer_error(layer | {"width_after": 8}) == ("-", None)
    assert path(layer) == "dense: Tanh"
    assert (
        path(layer | {"op": "Conv", "activation": "BatchNormalization+Relu"})
        == "conv: BatchNormalization+Relu"
    )
    report = {
        "params_before": 10,
        "params_after": 5,
        "file_size_before": 4096,
        "file_size_after": 2048,
        "layers": [layer, layer | {"name": "fc2", "refit": None}],
        "skipped": [],
    }
    text = format_reduce_table(report)
    assert "4.00 KiB -> 2.00 KiB" in text
    assert "Error: with data, the largest calibration error of a refit consumer" in text
    assert "; else the block error" in text  # fc2 has none: its block error


def _cli(*args: str) -> subprocess.CompletedProcess:
    # a colour terminal's environment, but stdout and stderr are pipes: still no escape codes
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    env |= {"PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    return subprocess.run(
        [sys.executable, "-m", "condense_graph", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_off_a_terminal_plain_tables_and_progress_lines_and_nothing_with_quiet(mixed, tmp_path):
    model, data = mixed
    args = ["reduce", str(model), str(tmp_path / "o.onnx"), "--data", str(data), "--target-params", "0.5"]
    proc = _cli(*args, "--verify", "--bench", "--runs", "2", "--warmup", "0")
    assert proc.returncode in (0, 1), proc.stderr
    assert not ANSI.search(proc.stdout) and not ANSI.search(proc.stderr)
    assert "\r" not in proc.stderr
    assert proc.stdout.splitlines()[0].startswith("+-") and "| Layer" in proc.stdout
    lines = proc.stderr.splitlines()
    condensing = [line for line in lines if line.startswith("condensing layers: ")]
    assert condensing and all(PROGRESS_LINE.match(line) for line in condensing)
    assert len(condensing) <= 2 * 12  # the width search's curves and the pass: about ten each at most
    assert any(line.startswith("--target-params step 1: widths") for line in lines)

    quiet = _cli(*args, "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""

    inspect = _cli("inspect", str(model))
    assert inspect.returncode == 0 and not ANSI.search(inspect.stdout) and "| Weight" in inspect.stdout
