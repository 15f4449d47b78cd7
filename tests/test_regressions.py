"""Bugs found in review, each with the scenario that showed it."""

import numpy as np
import onnx
import pytest
from builders import planted_mlp, x_to_y_model
from conftest import assert_same_outputs, check_full
from onnx import helper, numpy_helper

import condense_graph as cg
from condense_graph.cli import main


def test_bias_add_inserted_before_a_reduced_layer_keeps_shapes_valid(rng):
    w1 = rng.normal(size=(4, 6))
    w1[:, 2] = 0  # channel 2: constant relu(1) = 1
    b1 = rng.normal(size=6)
    b1[2] = 1.0
    w2 = rng.normal(size=(6, 5))
    w2[:, 4] = 2.5 * w2[:, 1]  # layer 2: a planted multiple
    m = x_to_y_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"]),
            helper.make_node("Add", ["m1", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["a1"]),
            helper.make_node("MatMul", ["a1", "w2"], ["m2"]),
            helper.make_node("Relu", ["m2"], ["a2"]),
            helper.make_node("MatMul", ["a2", "w3"], ["y"]),
        ],
        {"w1": w1, "b1": b1, "w2": w2, "w3": rng.normal(size=(5, 3))},
        ["N", 4],
        ["N", 3],
    )
    result = cg.condense(m, threshold=0.9999)
    assert [layer["width_after"] for layer in result.report["layers"]] == [5, 4]
    check_full(result.model)
    assert_same_outputs(m, result.model, {"x": rng.normal(size=(3, 4)).astype(np.float32)})


def test_conv_channels_read_by_a_matmul_over_width_are_left_alone(rng):
    m = x_to_y_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MatMul", ["r", "k"], ["y"]),
        ],
        {"w": np.repeat(rng.normal(size=(1, 2, 1, 1)), 4, axis=0), "k": rng.normal(size=(4, 3))},
        [1, 2, 5, 4],
        [1, 4, 5, 3],
    )
    result = cg.condense(m, threshold=0.5)
    assert result.report["layers"] == []
    assert any("last axis" in s["reason"] for s in result.report["skipped"])


def test_resize_with_sizes_is_refused(rng):
    m = x_to_y_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Resize", ["r", "", "", "sizes"], ["u"]),
            helper.make_node("Conv", ["u", "w2"], ["y"]),
        ],
        {"w": np.repeat(rng.normal(size=(1, 3, 1, 1)), 4, axis=0), "w2": rng.normal(size=(2, 4, 1, 1))},
        [1, 3, 4, 4],
        [1, 2, 8, 8],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "sizes"))
    result = cg.condense(m, threshold=0.5)
    assert result.report["layers"] == [] and "fixes its output sizes" in result.report["skipped"][0]["reason"]


def test_zero_post_scale_in_a_conv_layer_gives_no_nan(rng):
    scale = np.ones((1, 4, 1, 1))
    scale[0, 1] = 0.0
    w = np.repeat(rng.normal(size=(1, 3, 1, 1)), 4, axis=0)
    m = x_to_y_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Mul", ["r", "s"], ["p"]),
            helper.make_node("Conv", ["p", "w2"], ["y"]),
        ],
        {"w": w, "s": scale, "w2": rng.normal(size=(2, 4, 1, 1))},
        [1, 3, 4, 4],
        [1, 2, 4, 4],
    )
    result = cg.condense(m, threshold=0.9999)
    assert result.report["layers"][0]["width_after"] == 2  # 3 parallel channels merged, the zero one alone
    assert_same_outputs(m, result.model, {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_a_layer_with_all_outgoing_weights_zero_keeps_one_channel(rng):
    m = planted_mlp([4, 6, 2], [3])
    w2 = next(t for t in m.graph.initializer if t.name == "fc2.weight")
    w2.CopyFrom(numpy_helper.from_array(np.zeros((2, 6), np.float32), "fc2.weight"))
    result = cg.condense(m, threshold=0.9)
    assert result.report["layers"][0]["width_after"] == 1
    assert_same_outputs(m, result.model, {"x": rng.normal(size=(2, 4)).astype(np.float32)}, rtol=0)


def test_width_by_weight_name_wins_over_target_params():
    m = planted_mlp([6, 30, 20, 3], [10, 8])
    result = cg.condense(m, layer_widths={"fc1.weight": 4}, target_params=0.8)
    assert result.report["layers"][0]["width_after"] == 4


@pytest.mark.parametrize(
    "argv,message",
    [
        (["reduce", "{m}", "{o}", "--layer-width", "fc1=inf"], "positive integer"),
        (["verify", "{m}", "{m}", "--runs", "0"], "at least 1"),
    ],
)
def test_more_bad_options(argv, message, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(planted_mlp([4, 6, 2], [3]), path)
    assert main([a.format(m=path, o=tmp_path / "o.onnx") for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_unreduced_depthwise_blocks_get_no_extra_bias(tmp_path):
    torch = pytest.importorskip("torch")
    block = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 1, bias=False),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 4, 1, bias=False),
    ).eval()
    path = tmp_path / "b.onnx"
    torch.onnx.export(block, (torch.randn(1, 4, 6, 6),), str(path), dynamo=False, opset_version=17)
    result = cg.condense(str(path), threshold=1.0)
    assert result.report["layers"][0]["width_after"] == 8
    assert result.report["params_after"] == result.report["params_before"]
