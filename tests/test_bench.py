"""Benchmark math and the `bench` command on a tiny model."""

import json

import numpy as np
import onnx
import pytest
from builders import planted_mlp

from condense_graph.bench import count_macs, efficiency, latency_summary, speedup
from condense_graph.cli import main


def test_speedup_and_efficiency_math():
    assert speedup(10.0, 4.0) == 2.5
    assert efficiency(2.0, 1000, 250) == pytest.approx(0.5)  # 2x measured of 4x ideal
    assert efficiency(1.0, 0, 0) is None
    with pytest.raises(ValueError):
        speedup(1.0, 0.0)


def test_latency_summary_is_median_and_interquartile_range():
    summary = latency_summary([0.001, 0.002, 0.003, 0.004, 0.100])  # one outlier
    assert summary["median_ms"] == pytest.approx(3.0)
    assert summary["iqr_ms"] == pytest.approx(2.0)
    assert summary["runs"] == 5


def test_macs_of_an_mlp_and_a_conv():
    model = planted_mlp([5, 12, 10, 3], [4, 6])
    feeds = {"x": np.zeros((7, 5), np.float32)}
    assert count_macs(model, feeds) == 7 * (5 * 12 + 12 * 10 + 10 * 3)
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    conv = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(conv, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert count_macs(model, {"x": np.zeros((2, 3, 16, 16), np.float32)}) == 2 * 8 * 8 * 8 * 3 * 3 * 3


def test_bench_reports_every_field(tmp_path, capsys):
    big, small = tmp_path / "big.onnx", tmp_path / "small.onnx"
    onnx.save(planted_mlp([16, 256, 256, 4], [256, 256]), big)
    onnx.save(planted_mlp([16, 32, 32, 4], [32, 32]), small)
    report = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                str(big),
                str(small),
                "--runs",
                "5",
                "--warmup",
                "1",
                "--batch",
                "8",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    result = json.loads(report.read_text())
    assert (result["batch"], result["runs"], result["threads"]) == (8, 5, 1)
    base, other = result["models"]
    for entry in (base, other):
        assert {
            "model",
            "params",
            "macs",
            "file_size",
            "median_ms",
            "iqr_ms",
            "speedup",
            "ideal_speedup",
            "efficiency",
        } <= set(entry)
        assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0
    assert base["speedup"] == 1.0
    assert other["macs"] == 8 * (16 * 32 + 32 * 32 + 32 * 4)
    assert other["ideal_speedup"] == pytest.approx(base["macs"] / other["macs"])
    assert other["speedup"] == pytest.approx(base["median_ms"] / other["median_ms"])
    assert other["efficiency"] == pytest.approx(other["speedup"] / other["ideal_speedup"])
    table = capsys.readouterr().out
    assert "Speedup" in table and "MACs" in table


def test_reduce_bench_compares_the_written_model(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(planted_mlp([8, 64, 32, 4], [8, 4]), model)
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "reduce",
                str(model),
                str(tmp_path / "o.onnx"),
                "--threshold",
                "0.9999",
                "--bench",
                "--runs",
                "3",
                "--warmup",
                "1",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    bench = json.loads(report.read_text())["bench"]
    assert [m["model"] for m in bench["models"]] == [str(model), str(tmp_path / "o.onnx")]
    assert bench["models"][1]["params"] < bench["models"][0]["params"]
