"""Small models built in code for the tests (no binary fixtures).

`planted_mlp` builds an MLP whose hidden neurons are positive multiples of a few distinct
directions, so the exact reduced width of every layer is known in advance.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what onnxruntime reads; onnx.helper would write its newest


def planted_rows(rng, width: int, distinct: int, fan_in: int) -> np.ndarray:
    """[width, fan_in + 1] rows (weights | bias): `distinct` directions, each used at least once,
    every row a positive multiple (lambda in 0.1-10) of its direction."""
    base = rng.normal(size=(distinct, fan_in + 1))
    which = np.concatenate([np.arange(distinct), rng.integers(0, distinct, width - distinct)])
    rng.shuffle(which)
    lam = rng.uniform(0.1, 10.0, size=width)
    return (base[which] * lam[:, None]).astype(np.float32)


def planted_mlp(
    widths,
    distinct,
    form="gemm",
    activation="Relu",
    seed=0,
    batch="N",
    seq=None,
    trans_b=True,
    alpha=1.0,
    beta=1.0,
) -> onnx.ModelProto:
    """MLP widths[0] -> widths[1] -> ... -> widths[-1]; hidden layer i has distinct[i-1] directions.

    form: "gemm" (Gemm with transB/alpha/beta) or "matmul" (MatMul + Add bias, any rank with `seq`).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    shape = [batch, widths[0]] if seq is None else [batch, seq, widths[0]]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    cur = "x"
    for i in range(1, len(widths)):
        fan_in, width = widths[i - 1], widths[i]
        hidden = i < len(widths) - 1
        rows = (
            planted_rows(rng, width, distinct[i - 1], fan_in)
            if hidden
            else rng.normal(size=(width, fan_in + 1)).astype(np.float32)
        )
        cur = _dense(nodes, inits, cur, rows, f"fc{i}", form, trans_b, alpha, beta)
        if hidden and activation:
            nodes.append(helper.make_node(activation, [cur], [f"act{i}"], name=f"act{i}"))
            cur = f"act{i}"
    out_shape = shape[:-1] + [widths[-1]]
    y = helper.make_tensor_value_info(cur, TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "planted_mlp", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _dense(nodes, inits, cur, rows, name, form, trans_b, alpha, beta) -> str:
    weight, bias = rows[:, :-1], rows[:, -1]
    out = f"{name}_out"
    if form == "gemm":
        # y = alpha * x W' + beta * C reproduces rows (weights | bias) when W' = W/alpha, C = b/beta
        w = (weight / alpha).astype(np.float32)
        inits += [
            numpy_helper.from_array(w if trans_b else w.T.copy(), f"{name}.weight"),
            numpy_helper.from_array((bias / beta).astype(np.float32), f"{name}.bias"),
        ]
        nodes.append(
            helper.make_node(
                "Gemm",
                ["" + cur, f"{name}.weight", f"{name}.bias"],
                [out],
                name=name,
                transB=int(trans_b),
                alpha=alpha,
                beta=beta,
            )
        )
        return out
    inits += [
        numpy_helper.from_array(weight.T.copy(), f"{name}.weight"),
        numpy_helper.from_array(bias, f"{name}.bias"),
    ]
    nodes.append(helper.make_node("MatMul", [cur, f"{name}.weight"], [f"{name}_mm"], name=name))
    nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [out], name=f"{name}_bias"))
    return out


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def planted_cnn(
    channels, distinct, kernels, strides, pads, pool, head, activation="Relu", size=8, seed=0
) -> onnx.ModelProto:
    """Conv stack channels[0] -> channels[1] -> ... with planted positive multiples in each conv
    (distinct[i] kernel directions), optional MaxPool after each conv, then a dense head reached
    through Flatten ("flatten") or GlobalAveragePool + Flatten ("global")."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur, side = [], [], "x", size
    for i in range(1, len(channels)):
        k, s, p = kernels[i - 1], strides[i - 1], pads[i - 1]
        rows = planted_rows(rng, channels[i], distinct[i - 1], channels[i - 1] * k * k)
        inits += [
            numpy_helper.from_array(
                rows[:, :-1].reshape(channels[i], channels[i - 1], k, k), f"conv{i}.weight"
            ),
            numpy_helper.from_array(rows[:, -1].copy(), f"conv{i}.bias"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [cur, f"conv{i}.weight", f"conv{i}.bias"],
                [f"c{i}"],
                name=f"conv{i}",
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p] * 4,
            )
        )
        cur, side = f"c{i}", (side + 2 * p - k) // s + 1
        if activation:
            nodes.append(helper.make_node(activation, [cur], [f"a{i}"], name=f"act{i}"))
            cur = f"a{i}"
        if pool and side >= 2:
            nodes.append(helper.make_node("MaxPool", [cur], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            cur, side = f"p{i}", side // 2
    if head == "global":
        nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"]))
        cur, side = "gap", 1
    nodes.append(helper.make_node("Flatten", [cur], ["flat"], axis=1))
    features = channels[-1] * side * side
    inits += [
        numpy_helper.from_array(rng.normal(size=(3, features)).astype(np.float32), "head.weight"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "head.bias"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], ["y"], name="head", transB=1))
    graph = helper.make_graph(
        nodes,
        "planted_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels[0], size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def x_to_y_model(nodes, inits: dict, x_shape, y_shape) -> onnx.ModelProto:
    """A float32 model from input x to output y with `inits` (name -> array) as initializers."""
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def near_duplicate_mlp(activation, seed=0, noise=0.05, width=24, distinct=6):
    """x[8] -> Gemm(width) -> activation -> Gemm(width) -> activation -> Gemm(3); hidden neurons are
    noisy positive multiples of `distinct` directions."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur, fan_in = [], [], "x", 8
    for i, out in enumerate([width, width, 3]):
        base = rng.normal(size=(distinct, fan_in + 1))
        rows = base[rng.integers(0, distinct, out)] * rng.uniform(0.5, 2, (out, 1))
        rows = rows + noise * rng.normal(size=rows.shape) if i < 2 else rng.normal(size=(out, fan_in + 1))
        inits += [
            numpy_helper.from_array(rows[:, :-1].astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rows[:, -1].astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1))
        cur, fan_in = f"h{i}", out
        if i < 2:
            cur = _activation(nodes, activation, cur, i)
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=IR_VERSION + 1)


def _activation(nodes, activation, cur, i):
    if activation == "SiLU":
        nodes += [
            helper.make_node("Sigmoid", [cur], [f"s{i}"]),
            helper.make_node("Mul", [cur, f"s{i}"], [f"a{i}"]),
        ]
    elif activation == "GELU":
        nodes.append(helper.make_node("Gelu", [cur], [f"a{i}"]))
    else:
        nodes.append(helper.make_node(activation, [cur], [f"a{i}"]))
    return f"a{i}"
