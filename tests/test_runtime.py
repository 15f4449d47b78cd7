"""condense_graph.runtime: large models go through temporary external-data files; degraded paths
are logged and listed as warnings.

A model over the real 2 GB protobuf limit is too big for most test machines, so the limit (the
package's one, `model_io.PROTOBUF_LIMIT`) is lowered to a few KB: the models below then count as
large, and every session and shape inference of them goes through a file. The numbers must be those of the
in-memory path, exactly (the same graph runs in the same ONNX Runtime).
"""

import json
import logging

import numpy as np
import onnx
import pytest
from builders import planted_mlp
from onnx import helper

from condense_graph import api, model_io, runtime
from condense_graph.bench import benchmark, count_macs
from condense_graph.report import format_reduce_table
from condense_graph.verify import compare_models

SMALL_LIMIT = 1024  # bytes: the 13 KB model below and its 1.2 KB reduction are "over the limit"
FILE_PATH = "goes through the file"  # what runtime logs (DEBUG) when it takes the file path


def model_13kb() -> onnx.ModelProto:
    model = planted_mlp([16, 64, 32, 4], [6, 5], seed=2)
    assert model.ByteSize() > 3 * SMALL_LIMIT
    return model


def file_path_records(caplog) -> int:
    return sum(FILE_PATH in r.getMessage() for r in caplog.records if r.name == "condense_graph.runtime")


@pytest.fixture
def over_limit(monkeypatch, caplog):
    """Lower the limit and record runtime's DEBUG lines (how often the file path was taken)."""

    def lower():
        monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", SMALL_LIMIT)
        caplog.set_level(logging.DEBUG, logger="condense_graph.runtime")

    return lower


def test_sessions_and_shape_inference_through_files_equal_the_in_memory_path(over_limit, caplog):
    model = model_13kb()
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    in_memory = runtime.session(model).run(None, {"x": x})[0]
    inferred, error = runtime.infer_shapes(model)
    assert error is None and file_path_records(caplog) == 0
    over_limit()
    assert runtime.is_large(model) and not runtime.is_large(planted_mlp([2, 3, 2], [1]))
    from_file = runtime.session(model).run(None, {"x": x})[0]
    inferred_from_file, error = runtime.infer_shapes(model, data_prop=True)
    assert error is None and file_path_records(caplog) == 2
    np.testing.assert_array_equal(from_file, in_memory)
    # the same bytes: tensors loaded back from the data file are those of the in-memory inference
    assert inferred_from_file.SerializeToString() == inferred.SerializeToString()
    assert len(inferred.graph.value_info) == 4


def test_reduce_through_files_gives_the_same_report_and_model(over_limit, caplog):
    model = model_13kb()
    expected = api.condense(model, threshold=0.9999, verify=True)
    over_limit()
    result = api.condense(model, threshold=0.9999, verify=True)
    # the pass, the block-error probes, the safety net and verification all took the file path
    assert file_path_records(caplog) >= 8
    assert [layer["width_after"] for layer in result.report["layers"]] == [6, 5]
    assert result.report["params_after"] == expected.report["params_after"] < expected.report["params_before"]
    assert [layer["block_error"] for layer in result.report["layers"]] == [
        layer["block_error"] for layer in expected.report["layers"]
    ]
    assert result.report["verify"]["max_rel_err"] == expected.report["verify"]["max_rel_err"] < 1e-5
    # file sizes of a large model are its tensor bytes (`model_io.serialized_size`); all else is equal
    sizes = ("file_size_before", "file_size_after")
    same = [{k: v for k, v in r.report.items() if k not in sizes} for r in (result, expected)]
    assert json.dumps(same[0], sort_keys=True) == json.dumps(same[1], sort_keys=True)
    assert result.model.SerializeToString() == expected.model.SerializeToString()
    assert result.report["warnings"] == []


def test_verify_through_files_gives_the_same_numbers(over_limit, caplog):
    original = model_13kb()
    reduced = api.condense(original, threshold=0.99).model
    expected = compare_models(original, reduced, runs=3)
    over_limit()
    got = compare_models(original, reduced, runs=3)
    assert file_path_records(caplog) == 2  # one session per model
    assert got["max_abs_err"] == expected["max_abs_err"] and got["runs"] == 3
    assert got == expected


def test_bench_through_files_gives_the_same_counts(over_limit, caplog):
    original = model_13kb()
    reduced = api.condense(original, threshold=0.9999).model
    models = [("a", original, 1), ("b", reduced, 2)]
    expected = benchmark(models, batch=4, runs=2, warmup=0)
    over_limit()
    got = benchmark(models, batch=4, runs=2, warmup=0)
    assert file_path_records(caplog) == 4  # two sessions, two shape inferences for the MACs
    macs = [4 * (16 * 64 + 64 * 32 + 32 * 4), 4 * (16 * 6 + 6 * 5 + 5 * 4)]
    assert [e["macs"] for e in got["models"]] == [e["macs"] for e in expected["models"]] == macs
    assert [e["params"] for e in got["models"]] == [e["params"] for e in expected["models"]]
    assert got["models"][1]["ideal_speedup"] == expected["models"][1]["ideal_speedup"]
    assert got["warnings"] == expected["warnings"] == []


def with_custom_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with a custom-domain op after its last layer (onnx cannot know its shapes, ONNX
    Runtime has no kernel for it)."""
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("Mystery", ["pre"], [out], domain="com.example"))
    return model


def fail_on_custom_domains(monkeypatch) -> None:
    """onnx 1.23 skips ops of unknown domains instead of failing: fail the way older onnx and
    custom schemas do (InferenceError) for models that import one."""
    real = onnx.shape_inference.infer_shapes

    def infer_shapes(model, *args, **kwargs):
        if any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
            raise onnx.shape_inference.InferenceError("[ShapeInferenceError] no schema for Mystery\nmore")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", infer_shapes)


def test_failed_shape_inference_is_a_warning_in_the_report_the_table_and_the_log(monkeypatch, caplog):
    fail_on_custom_domains(monkeypatch)
    caplog.set_level(logging.WARNING)
    plain = api.condense(planted_mlp([16, 64, 32, 4], [6, 5], seed=2), threshold=0.9999)
    result = api.condense(with_custom_op(planted_mlp([16, 64, 32, 4], [6, 5], seed=2)), threshold=0.9999)
    warnings = result.report["warnings"]
    assert len(warnings) == 3, warnings
    assert warnings[0] == (
        "shape inference failed ([ShapeInferenceError] no schema for Mystery): the graph "
        "was analyzed without inferred shapes"
    )
    assert warnings[1].startswith("shape inference failed on the rewritten graph ([ShapeInferenceError]")
    assert warnings[2].startswith(
        "ONNX Runtime check waived: the input model does not load in ONNX Runtime either"
    )
    # the same reduction as without the custom op (ranks come from the declared shapes)
    assert [layer["width_after"] for layer in result.report["layers"]] == [6, 5]
    assert result.report["params_after"] == plain.report["params_after"]
    messages = {(r.name, r.levelno) for r in caplog.records if "shape inference failed" in r.getMessage()}
    assert ("condense_graph.graph", logging.WARNING) in messages
    assert any(r.name == "condense_graph.safety" and "waived" in r.getMessage() for r in caplog.records)
    table = format_reduce_table(result.report)
    assert table.endswith("\n".join(["Warnings (3):"] + [f"  {w}" for w in warnings]))
    assert plain.report["warnings"] == [] and "Warnings" not in format_reduce_table(plain.report)


def test_warnings_come_after_the_skipped_list():
    report = {
        "layers": [],
        "params_before": 10,
        "params_after": 10,
        "file_size_before": 100,
        "file_size_after": 100,
        "skipped": [{"name": "conv", "reason": "grouped"}],
        "warnings": ["shape inference failed (x): y"],
    }
    text = format_reduce_table(report)
    assert text.index("Skipped (1):") < text.index("Warnings (1):\n  shape inference failed (x): y")


def test_bench_macs_of_a_model_onnx_cannot_infer_are_zero_with_a_warning(monkeypatch, caplog):
    fail_on_custom_domains(monkeypatch)
    model = planted_mlp([5, 12, 3], [4])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    warnings = []
    with caplog.at_level(logging.WARNING, logger="condense_graph.bench"):
        assert count_macs(model, {"x": np.zeros((2, 5), np.float32)}, warnings) == 0
    assert warnings == [
        ("shape inference failed ([ShapeInferenceError] no schema for Mystery): MACs counted as 0")
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "condense_graph.bench"] == warnings


def test_onnx_runtime_errors_are_one_line():
    broken = planted_mlp([5, 12, 3], [4])
    broken.graph.node[-1].input[0] = "no_such_tensor"
    with pytest.raises(runtime.SessionError) as err:
        runtime.session(broken)
    assert "\n" not in str(err.value) and str(err.value).startswith("ONNX Runtime cannot load the model: ")
    assert err.value.reason in str(err.value)
    assert runtime.one_line(ValueError("first\nlast")) == "last"
    assert runtime.one_line(ValueError("first\nlast"), last=False) == "first"
    assert runtime.one_line(ValueError("")) == "ValueError"
