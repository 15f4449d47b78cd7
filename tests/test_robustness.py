"""Bad input, external data, odd dtypes, quantized graphs and graph shapes that must be respected.

Every bad input gets one line on stderr naming the problem, exit code 2, and leaves the input
file's bytes unchanged."""

import json
import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import IR_VERSION, planted_mlp, run
from conftest import assert_same_outputs, check_full, message_lines, rounding_scale
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg
from condense_graph import model_io
from condense_graph.cli import main


def cli_error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(message_lines(err)) == 1 and "Traceback" not in err
    return err


def reduce_fails(path, tmp_path, capsys, *extra) -> str:
    before = path.read_bytes()
    err = cli_error(["reduce", path, tmp_path / "out.onnx", *extra], capsys)
    assert path.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()
    return err


def write(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


# ---- bad files -------------------------------------------------------------------------------


def test_missing_file(tmp_path, capsys):
    assert "no such file" in cli_error(["reduce", tmp_path / "nope.onnx", tmp_path / "o.onnx"], capsys)


def test_not_an_onnx_file(tmp_path, capsys):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 10)
    assert "not a readable ONNX model" in reduce_fails(path, tmp_path, capsys)


def test_truncated_protobuf(tmp_path, capsys):
    data = planted_mlp([5, 12, 3], [4]).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable ONNX model" in reduce_fails(path, tmp_path, capsys)


def test_empty_graph(tmp_path, capsys):
    graph = helper.make_graph([], "empty", [], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    assert "graph is empty" in reduce_fails(write(tmp_path, model), tmp_path, capsys)


def test_model_failing_the_checker(tmp_path, capsys):
    model = planted_mlp([5, 12, 3], [4])
    model.graph.node[0].input[1] = "no_such_tensor"
    assert "fails onnx.checker" in reduce_fails(write(tmp_path, model), tmp_path, capsys)


@pytest.mark.parametrize(
    "opset,message", [(6, "older than 7"), (onnx.defs.onnx_opset_version() + 5, "newer than")]
)
def test_opset_out_of_range(opset, message, tmp_path, capsys):
    model = planted_mlp([5, 12, 3], [4])
    model.opset_import[0].version = opset
    assert message in reduce_fails(write(tmp_path, model), tmp_path, capsys)


def test_nan_weights_skip_the_layers_that_read_them_and_name_the_initializer(tmp_path, capsys):
    """Not refused at load (issue 10, item 9): the layers whose merge would read the NaN are skipped."""
    model = planted_mlp([5, 12, 3], [4])
    weight = numpy_helper.to_array(model.graph.initializer[2]).copy()
    weight[0, 0] = np.nan
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(weight, "fc2.weight"))
    path, out = write(tmp_path, model), tmp_path / "out.onnx"
    assert main(["reduce", str(path), str(out), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == [] and report["params_after"] == report["params_before"]
    assert "'fc2.weight' contains NaN or Inf" in report["skipped"][0]["reason"]
    assert onnx.load(str(out)).graph == model.graph  # nothing reduced: the model as it came


# ---- external data ---------------------------------------------------------------------------


def save_external(model, path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save rewrites the tensors it externalizes
    onnx.save(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def test_external_data_loads_and_saves(tmp_path, rng):
    model = planted_mlp([6, 20, 16, 3], [5, 4])
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    save_external(model, src)
    out = tmp_path / "o.onnx"
    assert main(["reduce", str(src), str(out), "--threshold", "0.9999", "--quiet"]) == 0
    reduced = onnx.load(str(out))
    assert [d.dims for d in reduced.graph.initializer][0] == [5, 6]
    assert_same_outputs(model, reduced, {"x": rng.normal(size=(3, 6)).astype(np.float32)})


def test_external_data_flag_and_the_2gb_limit(tmp_path, monkeypatch, rng):
    model = planted_mlp([6, 20, 16, 3], [5, 4])
    src = write(tmp_path, model)
    forced = tmp_path / "forced.onnx"
    assert main(["reduce", str(src), str(forced), "--external-data", "--quiet"]) == 0
    assert (tmp_path / "forced.onnx.data").exists()
    assert not any(
        t.raw_data
        for t in onnx.load(str(forced), load_external_data=False).graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    )
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 100)  # a model "over the limit"
    big = tmp_path / "big.onnx"
    assert main(["reduce", str(src), str(big), "--quiet"]) == 0
    assert (tmp_path / "big.onnx.data").exists()
    assert_same_outputs(
        onnx.load(str(forced)),
        onnx.load(str(big)),
        {"x": rng.normal(size=(2, 6)).astype(np.float32)},
        rtol=0.0,
    )
    assert sorted(os.listdir(tmp_path)) == [
        "big.onnx",
        "big.onnx.data",
        "forced.onnx",
        "forced.onnx.data",
        "m.onnx",
    ]


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_directory_is_refused(where, tmp_path, capsys):
    model = planted_mlp([6, 20, 3], [5])
    inner = tmp_path / "models"
    inner.mkdir()
    path = inner / "m.onnx"
    save_external(model, path)
    secret = tmp_path / "secret.bin"
    os.replace(inner / "m.onnx.data", secret)
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[where]
    if where == "symlink":
        os.symlink(secret, inner / "link.bin")
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())
    assert "points outside the model's directory" in reduce_fails(path, tmp_path, capsys)


def test_external_data_of_a_tensor_inside_an_if_branch_is_checked_too(tmp_path, capsys):
    """A weight inside an If body pointing at ../secret.bin is refused before anything is read."""
    model = planted_mlp([6, 20, 3], [5])
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "head"
    weight = numpy_helper.from_array(np.ones((1, 3), np.float32), "branch.weight")
    branch = helper.make_graph(
        [helper.make_node("Add", ["head", "branch.weight"], ["b_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)],
        [weight],
    )
    model.graph.node.append(helper.make_node("If", ["cond"], [out], then_branch=branch, else_branch=branch))
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    (tmp_path / "secret.bin").write_bytes(np.ones(3, np.float32).tobytes())
    inner = tmp_path / "models"
    inner.mkdir()
    for body in (model.graph.node[-1].attribute[0].g, model.graph.node[-1].attribute[1].g):
        tensor = body.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "12")):
            tensor.external_data.add(key=key, value=value)
    path = inner / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert "points outside the model's directory" in reduce_fails(path, tmp_path, capsys)


# ---- never lose the input --------------------------------------------------------------------


def test_an_interrupted_save_leaves_the_old_output(tmp_path, monkeypatch):
    src = write(tmp_path, planted_mlp([6, 20, 3], [5]))
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous output")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["reduce", str(src), str(out), "--quiet"])
    assert out.read_bytes() == b"previous output"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]


# ---- odd weights and types -------------------------------------------------------------------


def as_dtype(model, tensor_type, np_type):
    for i, t in enumerate(model.graph.initializer):
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(t).astype(np_type), t.name)
        )
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = tensor_type
    return model


def test_float16_model_is_written_back_in_float16(rng):
    model = as_dtype(planted_mlp([6, 20, 16, 3], [5, 4], seed=2), TensorProto.FLOAT16, np.float16)
    result = cg.condense(model, threshold=0.999)
    assert [layer["width_after"] for layer in result.report["layers"]] == [5, 4]
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    check_full(result.model)
    x = rng.normal(size=(4, 6)).astype(np.float16)
    expected, actual = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.abs(actual.astype(np.float32) - expected).max() <= 1e-2 * np.abs(expected).max()


def test_bfloat16_model_is_written_back_in_bfloat16():
    model = as_dtype(
        planted_mlp([6, 20, 16, 3], [5, 4], form="matmul", seed=2), TensorProto.BFLOAT16, ml_dtypes.bfloat16
    )
    result = cg.condense(model, threshold=0.99)
    assert [layer["width_after"] for layer in result.report["layers"]] == [5, 4]
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.BFLOAT16}
    check_full(result.model)
    # ONNX Runtime has no bfloat16 Relu on CPU: both models run upcast to float32 (the weights'
    # bfloat16 values exactly), on bfloat16-representable inputs, and the errors are taken in float32
    x = np.random.default_rng(5).normal(size=(64, 6)).astype(ml_dtypes.bfloat16).astype(np.float32)
    upcast = [
        as_dtype(onnx.load_from_string(m.SerializeToString()), TensorProto.FLOAT, np.float32)
        for m in (model, result.model)
    ]
    assert {t.data_type for m in upcast for t in m.graph.initializer} == {TensorProto.FLOAT}
    expected, actual = (run(m, {"x": x})[0] for m in upcast)
    scale = rounding_scale(upcast[0], {"x": x})[0]
    # bfloat16 keeps 8 significant bits: the merge may cost about one unit in the last place
    assert np.all(np.abs(actual - expected) <= 2.0**-8 * scale), np.abs(actual - expected).max()


def quantized_model():
    model = planted_mlp([6, 20, 3], [5], form="matmul")
    weight = next(t for t in model.graph.initializer if t.name == "fc1.weight")
    q = numpy_helper.from_array(
        np.clip(numpy_helper.to_array(weight) * 10, -127, 127).astype(np.int8), "fc1.q"
    )
    model.graph.initializer.remove(weight)
    model.graph.initializer.extend([q, numpy_helper.from_array(np.array(0.1, np.float32), "fc1.scale")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["fc1.q", "fc1.scale"], ["fc1.weight"]))
    model.graph.node.append(helper.make_node("MatMulInteger", ["xq", "fc1.q"], ["unused"], name="mmi"))
    model.graph.input.append(helper.make_tensor_value_info("xq", TensorProto.INT8, ["N", 6]))
    model.graph.output.append(helper.make_tensor_value_info("unused", TensorProto.INT32, ["N", 20]))
    return model


def test_quantized_weights_are_left_untouched():
    model = quantized_model()
    result = cg.condense(model, threshold=0.5)
    reasons = {s["name"]: s["reason"] for s in result.report["skipped"]}
    assert "dequantized" in reasons["fc1"] and "quantized op MatMulInteger" in reasons["mmi"]
    assert (
        result.model.SerializeToString()
        == onnx.load_from_string(model.SerializeToString()).SerializeToString()
    )


# ---- graph shapes ----------------------------------------------------------------------------


def relu_mlp_with(extra_nodes, extra_outputs, opset=17, domains=()):
    model = planted_mlp([6, 20, 3], [5])
    model.graph.node.extend(extra_nodes)
    model.graph.output.extend(extra_outputs)
    model.opset_import.extend([helper.make_opsetid(d, 1) for d in domains])
    return model


def custom_op_model():
    return relu_mlp_with(
        [helper.make_node("Swish", ["act1"], ["s"], domain="com.example", name="sw")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 20])],
        domains=["com.example"],
    )


def test_a_custom_domain_op_on_the_path_is_named():
    model = custom_op_model()
    onnx.checker.check_model(model)
    result = cg.condense(model, threshold=0.5)
    assert result.report["layers"] == []
    assert any("Swish 'sw'" in s["reason"] for s in result.report["skipped"])


def control_flow_model(op):
    if op == "Loop":
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Add", ["act1", "acc"], ["acc_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["N", 20]),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N", 20]),
            ],
        )
        node = helper.make_node("Loop", ["trip", "", "act1"], ["looped"], body=body)
        inits = [numpy_helper.from_array(np.array(2, np.int64), "trip")]
    else:
        body = helper.make_graph(
            [
                helper.make_node("Add", ["state", "row"], ["state_out"]),
                helper.make_node("Identity", ["row"], ["row_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("state", TensorProto.FLOAT, [20]),
                helper.make_tensor_value_info("row", TensorProto.FLOAT, [20]),
            ],
            [
                helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [20]),
                helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [20]),
            ],
        )
        node = helper.make_node("Scan", ["s0", "act1"], ["looped", "rows"], body=body, num_scan_inputs=1)
        inits = [numpy_helper.from_array(np.zeros(20, np.float32), "s0")]
    shape = ["N", 20] if op == "Loop" else [20]
    model = relu_mlp_with([node], [helper.make_tensor_value_info("looped", TensorProto.FLOAT, shape)])
    model.graph.initializer.extend(inits)
    if op == "Scan":
        model.graph.output.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 20]))
    return model


@pytest.mark.parametrize("op", ["Loop", "Scan"])
def test_channels_read_inside_loop_and_scan_bodies_are_left_alone(op):
    model = control_flow_model(op)
    result = cg.condense(model, threshold=0.5)
    assert result.report["layers"] == []
    assert any("subgraph" in s["reason"] or "control flow" in s["reason"] for s in result.report["skipped"])


def test_node_names_doc_strings_and_metadata_survive():
    model = planted_mlp([6, 20, 16, 3], [5, 4])
    model.graph.doc_string = "graph docs"
    model.graph.node[1].doc_string = "relu docs"
    onnx.helper.set_model_props(model, {"k": "v"})
    reduced = cg.condense(model, threshold=0.9999).model
    assert [n.name for n in reduced.graph.node] == [n.name for n in model.graph.node]
    assert reduced.graph.doc_string == "graph docs" and reduced.graph.node[1].doc_string == "relu docs"
    assert [(p.key, p.value) for p in reduced.metadata_props] == [("k", "v")]
    assert reduced.graph.name == model.graph.name


def graph_output_model():
    return relu_mlp_with([], [helper.make_tensor_value_info("act1", TensorProto.FLOAT, ["N", 20])])


def tied_model():
    return relu_mlp_with(
        [helper.make_node("Gemm", ["x", "fc1.weight"], ["tied"], name="tied", transB=1)],
        [helper.make_tensor_value_info("tied", TensorProto.FLOAT, ["N", 20])],
    )


def if_model():
    def branch(name):
        return helper.make_graph(
            [helper.make_node("Identity", ["act1"], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 20])],
        )

    model = relu_mlp_with(
        [helper.make_node("If", ["cond"], ["z"], then_branch=branch("t"), else_branch=branch("e"))],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 20])],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    return model


@pytest.mark.parametrize(
    "make,reason",
    [
        (graph_output_model, "graph output 'act1'"),
        (tied_model, "weight tying"),
        (if_model, "subgraph reads"),
        (lambda: control_flow_model("Loop"), "subgraph reads"),
        (lambda: control_flow_model("Scan"), "control flow (Scan"),
        (custom_op_model, "Swish 'sw'"),
        (quantized_model, "quantized op MatMulInteger"),
    ],
    ids=["graph-output", "tying", "if", "loop", "scan", "custom-op", "quantized"],
)
def test_graph_shapes_through_the_cli(make, reason, tmp_path):
    import json

    path = write(tmp_path, make())
    before = path.read_bytes()
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert (
        main(["reduce", str(path), str(out), "--threshold", "0.5", "--report", str(report), "--quiet"]) == 0
    )
    skipped = json.loads(report.read_text())["skipped"]
    assert any(reason in s["reason"] for s in skipped), skipped
    assert path.read_bytes() == before
    check_full(onnx.load(str(out)))
