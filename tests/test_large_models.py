"""Models over the 2 GB protobuf limit, end to end: reduce, verify, bench and save.

The package has one limit, `model_io.PROTOBUF_LIMIT`, which every path reads when it runs. The
tests below lower it to 1 byte (monkeypatch, the way onnxscript's test utilities fake large
models): every model then counts as large, so every ONNX Runtime session is built from a file with
external data, every shape inference reads a file, and every save writes `<name>.data`. The numbers
must be those of the small-model path, exactly: the same graphs run in the same ONNX Runtime.

One test builds a genuinely > 2 GB model; it needs RAM and minutes, and runs only with
`CONDENSE_SLOW=1` (and at least 24 GB of available memory: a run was seen past 19 GB resident).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import planted_mlp, run
from onnx import TensorProto, helper, numpy_helper

from condense_graph import api, model_io, runtime
from condense_graph.cli import main
from condense_graph.report import build_report

ONE_BYTE = 1  # a limit every model is over
THRESHOLD = "0.9999"
# what differs between a large and a small run: bytes on disk (a data file beside the model) and
# measured latencies
TIMING_KEYS = {"median_ms", "iqr_ms", "p25_ms", "p75_ms", "speedup", "efficiency"}
SIZE_KEYS = {"file_size"}  # a large model's size is its tensor bytes (`model_io.serialized_size`)


@pytest.fixture
def large(monkeypatch):
    """Call to make every model large from then on; returns the sources every ONNX Runtime session
    is built from (a path, or bytes for the in-memory path)."""
    sources = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        sources.append(source)
        return real(source, *args, **kwargs)

    def lower() -> list:
        monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", ONE_BYTE)
        monkeypatch.setattr(ort, "InferenceSession", spy)
        return sources

    return lower


def model_and_data():
    model = planted_mlp([12, 40, 24, 3], [7, 5], seed=4)
    rows = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    return model, rows


def assert_all_from_files(sources: list) -> None:
    """Sessions were built, every one from a file saved with its tensors in external data."""
    assert sources, "no ONNX Runtime session was built"
    for source in sources:
        assert isinstance(source, str) and source.endswith("model.onnx"), type(source)


def assert_external(path: Path) -> None:
    """The model at `path` keeps its tensors in `<name>.data` beside it."""
    assert (path.parent / f"{path.name}.data").is_file()
    tensors = onnx.load(str(path), load_external_data=False).graph.initializer
    assert tensors and all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in tensors)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> None:
    for expected, actual in zip(run(a, {"x": x}), run(b, {"x": x}), strict=True):
        np.testing.assert_array_equal(actual, expected)


def without_sizes_and_timings(report: dict) -> dict:
    """The report without file sizes (a large model's size is its tensor bytes:
    `model_io.serialized_size`), latencies and the output's name (the rest must match exactly)."""
    report = dict(report)
    report.pop("file_size_after", None)
    report.pop("file_size_before", None)
    if "bench" in report:
        report["bench"] = bench_counts(report["bench"], TIMING_KEYS | {"model"})
    return report


def bench_counts(bench: dict, left_out: set = TIMING_KEYS) -> dict:
    """A bench report without its latencies: what a large run must give exactly as a small one."""
    models = [{k: v for k, v in entry.items() if k not in left_out | SIZE_KEYS} for entry in bench["models"]]
    return bench | {"models": models}


def test_one_limit_every_path_reads_when_it_runs(monkeypatch, tmp_path):
    model = planted_mlp([4, 6, 2], [3])
    assert not hasattr(runtime, "PROTOBUF_LIMIT")  # no copy a lowered limit would miss
    assert not runtime.is_large(model) and not model_io.is_large(model)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", model.ByteSize())
    assert runtime.is_large(model) and model_io.is_large(model)
    model_io.save_model(model, tmp_path / "m.onnx")
    assert_external(tmp_path / "m.onnx")


def test_validation_of_a_large_model_in_memory_reads_a_file(monkeypatch):
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: checked.append(m) or real(m, *a, **k))
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", ONE_BYTE)
    model_io.load_model(planted_mlp([4, 6, 2], [3]))
    assert len(checked) == 1 and isinstance(checked[0], str)  # onnx refuses > 2 GB protos in memory


@pytest.mark.parametrize("with_data", [False, True], ids=["random", "data"])
def test_api_reduce_verify_and_save_of_a_large_model(with_data, large, tmp_path):
    model, rows = model_and_data()
    kwargs = {"threshold": 0.9999, "verify": True, "calibration": {"x": rows} if with_data else None}
    small = api.condense(model, **kwargs)
    sources = large()
    result = api.condense(model, **kwargs)
    assert_all_from_files(sources)
    same = without_sizes_and_timings
    assert json.dumps(same(result.report), sort_keys=True) == json.dumps(same(small.report), sort_keys=True)
    assert result.model.SerializeToString() == small.model.SerializeToString()
    assert [layer["width_after"] for layer in result.report["layers"]] == [7, 5]
    assert result.report["verify"]["max_rel_err"] < 1e-5
    path = tmp_path / "reduced.onnx"
    size = model_io.save_model(result.model, path)
    assert_external(path)
    assert size == path.stat().st_size + (tmp_path / "reduced.onnx.data").stat().st_size
    assert_same_outputs(result.model, onnx.load(str(path)), rows[:9])


def reduce_args(src: Path, out: Path, report: Path, data: Path | None) -> list[str]:
    args = ["reduce", str(src), str(out), "--threshold", THRESHOLD, "--verify", "--bench"]
    args += ["--runs", "2", "--warmup", "0", "--report", str(report), "--quiet"]
    return args + (["--data", str(data)] if data else [])


@pytest.mark.parametrize("with_data", [False, True], ids=["random", "data"])
def test_cli_reduce_verify_bench_of_a_large_model_equal_the_small_path(with_data, large, tmp_path):
    model, rows = model_and_data()
    src, data = tmp_path / "in.onnx", tmp_path / "calib.npz"
    model_io.save_model(model, src, external_data=True)  # the same input file for both runs
    np.savez(data, x=rows)
    data = data if with_data else None
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    assert main(reduce_args(src, small, tmp_path / "small.json", data)) == 0
    sources = large()
    assert main(reduce_args(src, big, tmp_path / "big.json", data)) == 0
    assert_all_from_files(sources)
    expected = json.loads((tmp_path / "small.json").read_text())
    got = json.loads((tmp_path / "big.json").read_text())
    assert without_sizes_and_timings(got) == without_sizes_and_timings(expected)
    assert [layer["width_after"] for layer in got["layers"]] == [7, 5]
    assert got["params_after"] == expected["params_after"] < got["params_before"]
    assert got["verify"]["pass"] and got["verify"]["max_abs_err"] == expected["verify"]["max_abs_err"]
    assert [e["macs"] for e in got["bench"]["models"]] == [e["macs"] for e in expected["bench"]["models"]]
    assert (tmp_path / "small.onnx.data").exists()  # the input's external-data layout is kept
    assert_external(big)
    assert got["file_size_after"] == big.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    calibration = {"x": rows} if with_data else None
    in_memory = api.condense(str(src), threshold=float(THRESHOLD), verify=True, calibration=calibration)
    assert_same_outputs(in_memory.model, onnx.load(str(big)), rows[:9])
    assert_same_outputs(onnx.load(str(small)), onnx.load(str(big)), rows[:9])


def test_cli_verify_and_bench_of_large_models_equal_the_small_path(large, tmp_path):
    model, rows = model_and_data()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model_io.save_model(model, src, external_data=True)
    model_io.save_model(api.condense(model, threshold=0.9999).model, out, external_data=True)
    np.savez(tmp_path / "rows.npz", x=rows)
    verify = ["verify", str(src), str(out), "--data", str(tmp_path / "rows.npz")]
    bench = ["bench", str(src), str(out), "--runs", "2", "--warmup", "0"]

    def report_of(args: list[str], name: str) -> dict:
        assert main([*args, "--report", str(tmp_path / name), "--quiet"]) == 0
        return json.loads((tmp_path / name).read_text())

    expected = [report_of(verify, "verify-small.json"), report_of(bench, "bench-small.json")]
    sources = large()
    got = report_of(verify, "verify-big.json")
    assert_all_from_files(sources)
    assert got == expected[0] and got["rows"] == 200 and got["max_rel_err"] < 1e-5
    del sources[:]
    got = report_of(bench, "bench-big.json")
    assert_all_from_files(sources)
    assert bench_counts(got) == bench_counts(expected[1])
    assert [e["macs"] for e in got["models"]] == [4 * 0 + 12 * 40 + 40 * 24 + 24 * 3, 12 * 7 + 7 * 5 + 5 * 3]


# a genuinely large model ------------------------------------------------------------------------

GIB = 2**30
WIDE = 1_200_000  # input and output features: each of the two wide weights is 256 x WIDE float32
HIDDEN, DISTINCT = 256, 240  # both hidden layers: 240 distinct directions of 256 neurons


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; 0 where /proc/meminfo is missing)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in lines)
    return int(fields.get("MemAvailable", "0 kB").split()[0]) * 1024


def planted_layer(rng, width: int, distinct: int, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """[width, fan_in] weights and [width] bias, rows positive multiples of `distinct` directions,
    built in float32 (the float64 that `planted_mlp` draws would double the memory)."""
    base = rng.standard_normal((distinct, fan_in + 1), dtype=np.float32)
    which = np.concatenate([np.arange(distinct), rng.integers(0, distinct, width - distinct)])
    rows = base[which]
    rows *= rng.uniform(0.5, 2.0, size=(width, 1)).astype(np.float32)
    return rows[:, :-1], rows[:, -1].copy()


def huge_mlp() -> onnx.ModelProto:
    """x [N, WIDE] -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y [N, WIDE]: 2.3 GB of weights, of which
    the hidden layers can merge 16 neurons each (the reduced model is still over the limit)."""
    rng = np.random.default_rng(0)
    w1, b1 = planted_layer(rng, HIDDEN, DISTINCT, WIDE)
    w2, b2 = planted_layer(rng, HIDDEN, DISTINCT, HIDDEN)
    w3 = rng.standard_normal((WIDE, HIDDEN), dtype=np.float32) / 16
    b3 = np.zeros(WIDE, np.float32)
    inits = [numpy_helper.from_array(w, n) for w, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    del w1
    inits += [numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(b3, "b3")]
    del w3
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"], name="act2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["y"], name="fc3", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDE])
    graph = helper.make_graph(nodes, "huge_mlp", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CONDENSE_SLOW") != "1", reason="set CONDENSE_SLOW=1 to run")
@pytest.mark.skipif(available_memory() < 24 * GIB, reason="needs 24 GB of available memory")
def test_a_model_over_2gb_reduces_verifies_and_saves(tmp_path):
    src, out, report = tmp_path / "huge.onnx", tmp_path / "huge.reduced.onnx", tmp_path / "r.json"
    model = huge_mlp()
    assert model_io.tensor_bytes(model) > model_io.PROTOBUF_LIMIT and model_io.is_large(model)
    model_io.save_model(model, src)
    del model
    assert_external(src)
    args = ["reduce", str(src), str(out), "--threshold", THRESHOLD, "--verify", "--report", str(report)]
    assert main([*args, "--quiet"]) == 0
    got = json.loads(report.read_text())
    assert [layer["width_after"] for layer in got["layers"]] == [DISTINCT, DISTINCT]
    kept = DISTINCT  # per hidden layer: w1, b1, w2, b2, w3 and b3 at the reduced widths
    assert got["params_after"] == kept * WIDE + kept + kept * kept + kept + WIDE * kept + WIDE
    assert got["verify"]["pass"] and got["verify"]["max_rel_err"] < 1e-4
    assert got["file_size_after"] > model_io.PROTOBUF_LIMIT  # the reduced model is large too
    assert_external(out)
    reduced = model_io.load_model(out)  # loads back, with its external data, and passes the checker
    x = np.random.default_rng(1).standard_normal((2, WIDE), dtype=np.float32)
    with runtime.path_if_large(reduced) as path:
        assert path is not None
        y = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert y.shape == (2, WIDE) and np.isfinite(y).all()


def test_sizes_of_a_large_model_never_call_byte_size(monkeypatch):
    """upb raises EncodeError from ByteSize() on a message over 2 GB: a large model's size in the
    report and the bench table is its tensor bytes (`model_io.serialized_size`)."""
    model, _ = model_and_data()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", ONE_BYTE)
    assert model_io.serialized_size(model) == model_io.tensor_bytes(model) > 0
    report = build_report(model, model, [], [])
    assert report["file_size_before"] == report["file_size_after"] == model_io.tensor_bytes(model)
