"""`condense-graph verify`: errors, cosine, top-1 agreement, accuracy, tolerances and exit codes."""

import json

import numpy as np
import onnx
import pytest
from builders import planted_mlp
from conftest import message_lines
from onnx import TensorProto, helper, numpy_helper

from condense_graph.cli import main
from condense_graph.verify import compare_models


def classifier(seed=0, seq=False):
    """x [N, 6] (or [N, S, 6]) -> Gemm/MatMul -> Relu -> ... -> Softmax 'probs' over 4 classes."""
    model = planted_mlp([6, 12, 4], [5], form="matmul", seed=seed, seq="S" if seq else None)
    last = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [last.name], ["probs"], axis=-1))
    shape = ["N", "S", 4] if seq else ["N", 4]
    model.graph.output.pop()
    model.graph.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, shape))
    return model


def perturbed(model, scale):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = copy.graph.initializer[0]
    values = numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).normal(size=values.shape).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(values + scale * noise, weight.name))
    return copy


@pytest.fixture
def files(tmp_path):
    model = classifier()
    paths = {"orig": tmp_path / "orig.onnx", "same": tmp_path / "same.onnx", "off": tmp_path / "off.onnx"}
    onnx.save(model, paths["orig"])
    onnx.save(model, paths["same"])
    onnx.save(perturbed(model, 0.5), paths["off"])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    paths["data"] = tmp_path / "data.npz"
    np.savez(paths["data"], x=x, y=rng.integers(0, 4, 300))
    return paths


def test_a_model_against_itself_has_zero_error(files, tmp_path, capsys):
    report = tmp_path / "v.json"
    assert (
        main(
            [
                "verify",
                str(files["orig"]),
                str(files["same"]),
                "--atol",
                "0",
                "--rtol",
                "0",
                "--min-agreement",
                "1",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    out = json.loads(report.read_text())["outputs"]["probs"]
    assert out["max_abs_err"] == 0.0 and out["max_rel_err"] == 0.0
    assert out["cosine"] == pytest.approx(1.0, abs=1e-12) and out["top1_agreement"] == 1.0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value", [("--atol", "1e-3"), ("--rtol", "1e-3"), ("--min-agreement", "0.999")])
def test_a_perturbed_copy_fails_each_tolerance(flag, value, files, capsys):
    argv = ["verify", str(files["orig"]), str(files["off"]), "--data", str(files["data"]), flag, value]
    assert main(argv) == 1
    assert "FAIL" in capsys.readouterr().out


def test_data_with_labels_gives_both_accuracies(files, tmp_path):
    report = tmp_path / "v.json"
    # a copy perturbed by 0.5 fails the default tolerances (issue 10 item 12; it passed before)
    assert (
        main(
            [
                "verify",
                str(files["orig"]),
                str(files["off"]),
                "--data",
                str(files["data"]),
                "--labels",
                "y",
                "--batch-size",
                "64",
                "--report",
                str(report),
            ]
        )
        == 1
    )
    result = json.loads(report.read_text())
    out = result["outputs"]["probs"]
    assert result["inputs"] == "data" and result["runs"] == 5  # 300 rows in batches of 64
    model_a, model_b = onnx.load(files["orig"]), onnx.load(files["off"])
    data = np.load(files["data"])
    from builders import run

    pa, pb = run(model_a, {"x": data["x"]})[0], run(model_b, {"x": data["x"]})[0]
    assert out["accuracy_original"] == pytest.approx(np.mean(pa.argmax(1) == data["y"]))
    assert out["accuracy_reduced"] == pytest.approx(np.mean(pb.argmax(1) == data["y"]))
    assert out["top1_agreement"] == pytest.approx(np.mean(pa.argmax(1) == pb.argmax(1)))
    cosine = float(np.sum(pa * pb) / np.sqrt(np.sum(pa * pa) * np.sum(pb * pb)))
    assert out["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert out["max_abs_err"] == pytest.approx(float(np.abs(pa - pb).max()), rel=1e-6)


def test_dynamic_dimensions_come_from_input_shape(tmp_path):
    model = classifier(seq=True)
    reduced = perturbed(model, 1e-3)
    result = compare_models(model, reduced, {"x": [3, 7, 6]}, runs=2)
    assert 0 < result["outputs"]["probs"]["max_abs_err"] < 1e-2
    onnx.save(model, tmp_path / "a.onnx")
    assert (
        main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx"), "--input-shape", "x:2,5,6"]) == 0
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{missing}"], "cannot read data file"),
        (["--labels", "y"], "--labels needs --data"),
        (["--data", "{wrong}"], "has no array 'x'"),
    ],
)
def test_bad_verify_input_is_one_line_exit_2(args, message, files, tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", z=np.zeros((3, 6), np.float32))
    argv = ["verify", str(files["orig"]), str(files["same"])] + [
        a.format(missing=tmp_path / "nope.npz", wrong=tmp_path / "wrong.npz") for a in args
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(message_lines(err)) == 1


def test_regression_outputs_get_no_top1_agreement():
    model = planted_mlp([4, 8, 3], [3])
    result = compare_models(model, model, runs=2)
    assert "top1_agreement" not in result["outputs"][model.graph.output[0].name]
