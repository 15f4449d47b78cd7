"""condense_graph.onnx_module: ONNX graphs rebuilt as trainable torch modules, checked against ONNX Runtime
(max |torch - ORT| <= 1e-5 * max(1, max |ORT|)), trained one step and written back."""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg
from condense_graph.errors import CondenseError

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import MobileNetV2, randomize_batchnorm  # noqa: E402

from condense_graph.onnx_module import from_onnx, to_onnx  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples"
TOL = 1e-5


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def torch_run(module, *arrays) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(a) for a in arrays))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def assert_matches_ort(model: onnx.ModelProto, module, feeds: dict) -> None:
    expected = ort_run(model, feeds)
    actual = torch_run(module, *feeds.values())
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = max(1.0, float(np.abs(e).max()))
        assert float(np.abs(a.astype(np.float64) - e).max()) <= TOL * scale


def mlp_rows(n: int = 64) -> np.ndarray:
    return np.load(EXAMPLE / "drm19_states.npz")["state"][:n].astype(np.float32)


def export(module, x, dynamo: bool, path) -> onnx.ModelProto:
    """TorchScript (opset 17) or dynamo (opset 18) export that keeps BatchNormalization unfolded
    (`do_constant_folding=False`; `optimize=False` for dynamo, whose optimizer folds it)."""
    options = {"optimize": False, "verbose": False} if dynamo else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamo=dynamo,
            opset_version=18 if dynamo else 17,
            do_constant_folding=False,
            dynamic_axes=None if dynamo else {"x": {0: "batch"}, "y": {0: "batch"}},
            **options,
        )
    return onnx.load(str(path))


def test_drm19_mlp_matches_ort():
    model = onnx.load(EXAMPLE / "drm19_mlp.onnx")
    module = from_onnx(model)
    assert module.input_names == ["state"] and module.output_names == ["rate"]
    assert module.onnx_name("weights._0_weight") == "0.weight"
    assert set(module.initializer_names.values()) == {t.name for t in model.graph.initializer}
    assert all(p.requires_grad for p in module.parameters())
    assert_matches_ort(model, module, {"state": mlp_rows()})
    rows = np.random.default_rng(0).standard_normal((7, 23)).astype(np.float32)
    assert_matches_ort(model, module, {"state": rows})


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_small_cnn_both_exporters(dynamo, tmp_path):
    torch.manual_seed(0)
    net = SmallCNN().eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8)
    model = export(net, x, dynamo, tmp_path / "cnn.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool"} <= ops
    module = from_onnx(model)
    assert_matches_ort(model, module, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), net(x).numpy(), rtol=0, atol=1e-5)
    # BatchNormalization keeps its running statistics in train mode too; mean/var are buffers
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    buffers = set(dict(module.named_buffers()))
    stats = {slot for slot, name in module.initializer_names.items() if name in bn.input[3:5]}
    assert len(stats) == 2 and stats <= buffers
    module.train()
    assert_matches_ort(model, module, {"x": x.numpy()})
    if not dynamo:  # the TorchScript export has a dynamic batch axis
        assert_matches_ort(
            model, module, {"x": np.random.default_rng(2).standard_normal((5, 3, 8, 8), np.float32)}
        )


def test_mobilenet_v2_matches_ort(tmp_path):
    torch.manual_seed(0)
    net = MobileNetV2(num_classes=10).eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 32, 32)
    model = export(net, x, False, tmp_path / "mobilenet.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Clip", "Add"} <= ops
    assert any(a.name == "group" and a.i > 1 for n in model.graph.node for a in n.attribute)
    module = from_onnx(model)
    assert_matches_ort(model, module, {"x": x.numpy()})
    assert_matches_ort(
        model, module, {"x": np.random.default_rng(4).standard_normal((2, 3, 32, 32), np.float32)}
    )


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def shape_ops_model() -> onnx.ModelProto:
    """X [N, 4, 6] through Transpose/Shape/Gather/Unsqueeze/Concat/Reshape/Split/Slice/HardSwish/PRelu."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Transpose", ["X"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Shape", ["t"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["t", "flat_shape"], ["flat"]),
        helper.make_node("Reshape", ["t", "zero_minus_one"], ["flat0"]),
        helper.make_node("Split", ["flat", "split"], ["a", "b"], axis=1),
        helper.make_node("Slice", ["b", "starts", "ends", "axes", "steps"], ["b_sliced"]),
        helper.make_node("Slice", ["a", "rstarts", "rends", "axes", "rsteps"], ["a_reversed"]),
        helper.make_node("HardSwish", ["a"], ["a_hs"]),
        helper.make_node("PRelu", ["a_hs", "slope"], ["a_prelu"]),
        helper.make_node("Gather", ["a_prelu", "cols"], ["gathered"], axis=1),
        helper.make_node("Concat", ["b_sliced", "a_reversed", "gathered"], ["Y"], axis=1),
        helper.make_node("Unsqueeze", ["Y", "one_axes"], ["Y3"]),
        helper.make_node("Squeeze", ["Y3", "one_axes"], ["Ysq"]),
        helper.make_node("Slice", ["flat0", "zero_axes", "fourteen", "one_axes"], ["flat14"]),
        helper.make_node("Add", ["Ysq", "flat14"], ["Z"]),
    ]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("zero_axes", np.array([0], np.int64)),
        _init("one_axes", np.array([1], np.int64)),
        _init("minus_one", np.array([-1], np.int64)),
        _init("zero_minus_one", np.array([0, -1], np.int64)),
        _init("split", np.array([10, 14], np.int64)),
        _init("starts", np.array([1], np.int64)),
        _init("ends", np.array([13], np.int64)),
        _init("axes", np.array([1], np.int64)),
        _init("steps", np.array([2], np.int64)),
        _init("rstarts", np.array([-1], np.int64)),
        _init("rends", np.array([-100], np.int64)),
        _init("rsteps", np.array([-3], np.int64)),
        _init("slope", rng.uniform(0.1, 0.5, 10).astype(np.float32)),
        _init("cols", np.array([0, 3, 5, -1], np.int64)),
        _init("fourteen", np.array([14], np.int64)),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_ops",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 6])],
        [
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 14]),
            helper.make_tensor_value_info("a_reversed", TensorProto.FLOAT, ["N", 4]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_shape_ops_model_matches_ort():
    model = shape_ops_model()
    module = from_onnx(model)
    assert [name for name, _ in module.named_parameters()] == ["weights.slope"]
    rng = np.random.default_rng(6)
    for batch in (3, 1, 8):
        assert_matches_ort(model, module, {"X": (rng.standard_normal((batch, 4, 6)) * 4).astype(np.float32)})


def test_one_adam_step_writes_back(tmp_path):
    model = onnx.load(EXAMPLE / "drm19_mlp.onnx")
    before = model.SerializeToString()
    module = from_onnx(model)
    x = torch.from_numpy(mlp_rows(32))
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    loss = torch.nn.functional.mse_loss(module(x), torch.zeros(32, 23))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(start[name], p) for name, p in module.named_parameters())
    trained = to_onnx(module)
    assert model.SerializeToString() == before
    assert [t.name for t in trained.graph.initializer] == [t.name for t in model.graph.initializer]
    assert [t.data_type for t in trained.graph.initializer] == [t.data_type for t in model.graph.initializer]
    onnx.checker.check_model(trained, full_check=True)
    expected = torch_run(module, x.numpy())[0]
    actual = ort_run(trained, {"state": x.numpy()})[0]
    assert float(np.abs(actual - expected).max()) <= TOL * max(1.0, float(np.abs(expected).max()))
    old = ort_run(model, {"state": x.numpy()})[0]
    assert float(np.abs(old - expected).max()) > 1e-4  # the step moved the outputs


def test_refuses_unsupported_ops_naming_them_all():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("Relu", ["X"], ["r"]),
        helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=branch, else_branch=branch),
        helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms"),
        helper.make_node("TopK", ["r", "k"], ["v", "i"], name="topk"),
    ]
    graph = helper.make_graph(
        nodes,
        "refused",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("X", "cond", "boxes", "scores", "k")
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(CondenseError) as info:
        from_onnx(helper.make_model(graph))
    message = str(info.value)
    for expected in ("If", "the_if", "NonMaxSuppression", "nms", "TopK", "topk"):
        assert expected in message
    assert "Relu" not in message


def test_condensed_mlp_matches_ort():
    model = onnx.load(EXAMPLE / "drm19_mlp.onnx")
    result = cg.condense(model, threshold=0.9)
    reduced = result.model
    assert result.report["params_after"] < result.report["params_before"]
    module = from_onnx(reduced)
    assert_matches_ort(reduced, module, {"state": mlp_rows()})


def _rand(*shape, seed=7, positive=False):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.1 if positive else values


# (id, op, feeds, initializers, attributes, output elem types, opset); inputs named as listed, "" = omitted
OP_CASES = [
    (
        "gemm_transA_alpha_beta",
        "Gemm",
        {"A": _rand(5, 3)},
        {"B": _rand(5, 4, seed=1), "C": _rand(4, seed=2)},
        {"transA": 1, "alpha": 0.5, "beta": 2.0},
        [1],
        17,
    ),
    (
        "gemm_transB",
        "Gemm",
        {"A": _rand(3, 5)},
        {"B": _rand(4, 5, seed=1), "C": _rand(3, 4, seed=2)},
        {"transB": 1},
        [1],
        17,
    ),
    ("matmul_batched", "MatMul", {"A": _rand(2, 3, 5)}, {"B": _rand(5, 4, seed=1)}, {}, [1], 17),
    (
        "conv1d_same_upper",
        "Conv",
        {"X": _rand(2, 4, 11)},
        {"W": _rand(6, 4, 4, seed=1), "b": _rand(6)},
        {"auto_pad": "SAME_UPPER", "strides": [2]},
        [1],
        17,
    ),
    (
        "conv1d_same_lower_grouped",
        "Conv",
        {"X": _rand(2, 4, 10)},
        {"W": _rand(6, 2, 4, seed=1)},
        {"auto_pad": "SAME_LOWER", "strides": [3], "group": 2},
        [1],
        17,
    ),
    (
        "conv1d_dilated_pads",
        "Conv",
        {"X": _rand(2, 4, 10)},
        {"W": _rand(6, 4, 3, seed=1)},
        {"pads": [1, 3], "dilations": [2]},
        [1],
        17,
    ),
    (
        "conv2d_valid",
        "Conv",
        {"X": _rand(1, 3, 7, 6)},
        {"W": _rand(4, 3, 3, 2, seed=1)},
        {"auto_pad": "VALID", "strides": [2, 1]},
        [1],
        17,
    ),
    (
        "conv2d_asymmetric_pads_depthwise",
        "Conv",
        {"X": _rand(2, 4, 6, 6)},
        {"W": _rand(4, 1, 3, 3, seed=1)},
        {"pads": [0, 1, 2, 1], "group": 4},
        [1],
        17,
    ),
    (
        "batchnorm",
        "BatchNormalization",
        {"X": _rand(2, 3, 4)},
        {
            "s": _rand(3, seed=1),
            "bias": _rand(3, seed=2),
            "mean": _rand(3, seed=3),
            "var": _rand(3, seed=4, positive=True),
        },
        {"epsilon": 1e-3},
        [1],
        15,
    ),
    (
        "avgpool_pads_exclude",
        "AveragePool",
        {"X": _rand(1, 2, 7, 7)},
        {},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        [1],
        17,
    ),
    (
        "avgpool_asymmetric_include",
        "AveragePool",
        {"X": _rand(1, 2, 6, 6)},
        {},
        {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "count_include_pad": 1},
        [1],
        17,
    ),
    (
        "avgpool_same_upper",
        "AveragePool",
        {"X": _rand(1, 2, 7, 7)},
        {},
        {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        [1],
        17,
    ),
    (
        "maxpool_ceil",
        "MaxPool",
        {"X": _rand(1, 2, 7, 7)},
        {},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
        [1],
        17,
    ),
    ("maxpool_1d_pads", "MaxPool", {"X": _rand(2, 3, 9)}, {}, {"kernel_shape": [3], "pads": [1, 1]}, [1], 17),
    ("global_max_pool", "GlobalMaxPool", {"X": _rand(2, 3, 4, 5)}, {}, {}, [1], 17),
    ("reduce_mean_attr", "ReduceMean", {"X": _rand(2, 3, 4)}, {}, {"axes": [1, -1], "keepdims": 0}, [1], 17),
    ("reduce_sum_input", "ReduceSum", {"X": _rand(2, 3, 4)}, {"axes": np.array([2], np.int64)}, {}, [1], 17),
    (
        "reduce_mean_input_18",
        "ReduceMean",
        {"X": _rand(2, 3, 4)},
        {"axes": np.array([0], np.int64)},
        {"keepdims": 0},
        [1],
        18,
    ),
    ("softmax_axis1", "Softmax", {"X": _rand(2, 3, 4)}, {}, {"axis": 1}, [1], 17),
    ("log_softmax", "LogSoftmax", {"X": _rand(2, 3, 4)}, {}, {}, [1], 17),
    ("softmax_opset11_coerced", "Softmax", {"X": _rand(2, 3, 4)}, {}, {"axis": 1}, [1], 11),
    ("gelu_tanh", "Gelu", {"X": _rand(3, 4)}, {}, {"approximate": "tanh"}, [1], 20),
    ("gelu", "Gelu", {"X": _rand(3, 4)}, {}, {}, [1], 20),
    ("elu", "Elu", {"X": _rand(3, 4)}, {}, {"alpha": 0.7}, [1], 17),
    ("selu", "Selu", {"X": _rand(3, 4)}, {}, {}, [1], 17),
    ("softplus", "Softplus", {"X": _rand(3, 4)}, {}, {}, [1], 17),
    ("hard_sigmoid", "HardSigmoid", {"X": _rand(3, 4)}, {}, {"alpha": 0.3, "beta": 0.4}, [1], 17),
    ("leaky_relu", "LeakyRelu", {"X": _rand(3, 4)}, {}, {"alpha": 0.2}, [1], 17),
    ("clip_inputs", "Clip", {"X": _rand(3, 4)}, {"lo": np.float32(-0.5), "hi": np.float32(0.3)}, {}, [1], 17),
    ("clip_max_only", "Clip", {"X": _rand(3, 4)}, {"": None, "hi": np.float32(0.3)}, {}, [1], 17),
    ("clip_attrs", "Clip", {"X": _rand(3, 4)}, {}, {"min": -0.5, "max": 0.3}, [1], 6),
    ("pow_sqrt_like", "Pow", {"X": _rand(3, 4, positive=True)}, {"e": np.float32(0.5)}, {}, [1], 17),
    ("div", "Div", {"X": _rand(3, 4)}, {"d": _rand(4, positive=True)}, {}, [1], 17),
    ("erf", "Erf", {"X": _rand(3, 4)}, {}, {}, [1], 17),
    ("log", "Log", {"X": _rand(3, 4, positive=True)}, {}, {}, [1], 17),
    ("flatten_axis0", "Flatten", {"X": _rand(2, 3, 4)}, {}, {"axis": 0}, [1], 17),
    ("flatten_axis2", "Flatten", {"X": _rand(2, 3, 4)}, {}, {"axis": 2}, [1], 17),
    (
        "reshape_allowzero",
        "Reshape",
        {"X": _rand(2, 3, 4)},
        {"s": np.array([4, 3, 2], np.int64)},
        {"allowzero": 1},
        [1],
        17,
    ),
    ("split_num_outputs", "Split", {"X": _rand(2, 7)}, {}, {"axis": 1, "num_outputs": 3}, [1, 1, 1], 18),
    ("split_attr", "Split", {"X": _rand(6, 2)}, {}, {"split": [2, 4]}, [1, 1], 11),
    (
        "pad_constant",
        "Pad",
        {"X": _rand(2, 3)},
        {"p": np.array([1, 0, 2, 3], np.int64), "v": np.float32(1.5)},
        {},
        [1],
        17,
    ),
    (
        "pad_axes",
        "Pad",
        {"X": _rand(2, 3, 4)},
        {"p": np.array([1, 2], np.int64), "": None, "axes": np.array([-1], np.int64)},
        {},
        [1],
        18,
    ),
    ("expand", "Expand", {"X": _rand(3, 1)}, {"s": np.array([2, 1, 4], np.int64)}, {}, [1], 17),
    (
        "where_less",
        "Where",
        {"c": _rand(3, 4) < 0},
        {"a": _rand(3, 4, seed=1), "b": _rand(4, seed=2)},
        {},
        [1],
        17,
    ),
    (
        "equal",
        "Equal",
        {"a": np.array([1, 2, 3], np.int64)},
        {"b": np.array([1, 0, 3], np.int64)},
        {},
        [9],
        17,
    ),
    ("greater", "Greater", {"a": _rand(3, 4)}, {"b": _rand(4, seed=2)}, {}, [9], 17),
    ("less", "Less", {"a": _rand(3, 4)}, {"b": _rand(4, seed=2)}, {}, [9], 17),
    ("min", "Min", {"a": _rand(3, 4)}, {"b": _rand(4, seed=2), "c": _rand(3, 1, seed=3)}, {}, [1], 17),
    ("max", "Max", {"a": _rand(3, 4)}, {"b": _rand(4, seed=2)}, {}, [1], 17),
    ("sum", "Sum", {"a": _rand(3, 4)}, {"b": _rand(4, seed=2), "c": _rand(3, 4, seed=3)}, {}, [1], 17),
    ("cast_to_int", "Cast", {"X": _rand(3, 4) * 5}, {}, {"to": TensorProto.INT64}, [7], 17),
    ("cast_like", "CastLike", {"X": np.array([1, 2], np.int64)}, {"t": np.float32(0)}, {}, [1], 17),
    (
        "constant_of_shape",
        "ConstantOfShape",
        {"s": np.array([2, 3], np.int64)},
        {},
        {"value": numpy_helper.from_array(np.array([2.5], np.float32))},
        [1],
        17,
    ),
    ("shape_start_end", "Shape", {"X": _rand(2, 3, 4)}, {}, {"start": 1, "end": -1}, [7], 17),
    ("squeeze_all", "Squeeze", {"X": _rand(1, 3, 1, 4)}, {}, {}, [1], 17),
    ("transpose_default", "Transpose", {"X": _rand(2, 3, 4)}, {}, {}, [1], 17),
    ("dropout", "Dropout", {"X": _rand(2, 3)}, {}, {}, [1], 17),
]


def single_op_model(op, feeds, inits, attrs, out_types, opset) -> onnx.ModelProto:
    names = list(feeds) + list(inits)
    outputs = [f"y{i}" for i in range(len(out_types))]
    node = helper.make_node(op, names, outputs, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in feeds.items()
        ],
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(outputs, out_types, strict=True)],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items() if n],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_single_ops_match_ort(case):
    _, op, feeds, inits, attrs, out_types, opset = case
    model = single_op_model(op, feeds, inits, attrs, out_types, opset)
    assert_matches_ort(model, from_onnx(model), feeds)
