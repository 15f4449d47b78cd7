"""Property-based tests (hypothesis).

Profiles: "ci" (default: fixed seed, few examples, what CI runs) and "dev" (many examples), chosen
with HYPOTHESIS_PROFILE=dev python -m pytest tests/test_properties.py
"""

import os

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, OPSET, planted_cnn, planted_mlp, run
from conftest import assert_equal_to_rounding, assert_same_outputs, check_full
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg

settings.register_profile(
    "ci", max_examples=50, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EXACT_ACTIVATIONS = ["Relu", "LeakyRelu", None]


@st.composite
def planted_dense(draw):
    depth = draw(st.integers(1, 3))
    widths = (
        [draw(st.integers(3, 8))]
        + [draw(st.integers(3, 14)) for _ in range(depth)]
        + [draw(st.integers(1, 4))]
    )
    # A layer merged down to d directions leaves the next layer's neurons in d+1 dimensions; in 2
    # dimensions random neurons are often within the threshold of each other for real, so every
    # layer but the last keeps at least 3 directions.
    distinct = [draw(st.integers(3 if i < depth - 1 else 1, w)) for i, w in enumerate(widths[1:-1])]
    form = draw(st.sampled_from(["gemm", "matmul", "matmul-seq"]))
    return dict(
        widths=widths,
        distinct=distinct,
        form=form,
        activation=draw(st.sampled_from(EXACT_ACTIVATIONS)),
        seed=draw(st.integers(0, 2**16)),
        trans_b=draw(st.booleans()),
    )


@given(planted_dense())
def test_planted_dense_graphs_reduce_exactly(case):
    seq = 3 if case["form"] == "matmul-seq" else None
    model = planted_mlp(
        case["widths"],
        case["distinct"],
        form=case["form"].split("-")[0],
        seq=seq,
        activation=case["activation"],
        seed=case["seed"],
        trans_b=case["trans_b"],
    )
    result = cg.condense(model, threshold=0.9999)
    assert [layer["width_after"] for layer in result.report["layers"]] == case["distinct"]
    check_full(result.model)
    shape = (4, case["widths"][0]) if seq is None else (4, seq, case["widths"][0])
    x = np.random.default_rng(case["seed"]).normal(size=shape).astype(np.float32)
    assert_equal_to_rounding(model, result.model, {"x": x})


@st.composite
def planted_conv(draw):
    depth = draw(st.integers(1, 2))
    channels = [draw(st.integers(1, 3))] + [draw(st.integers(3, 10)) for _ in range(depth)]
    distinct = [draw(st.integers(3 if i < depth - 1 else 1, c)) for i, c in enumerate(channels[1:])]
    kernels = [draw(st.sampled_from([1, 3])) for _ in range(depth)]
    assume(channels[0] * kernels[0] ** 2 >= 3)  # neurons of at least 4 dimensions, as above
    strides = [draw(st.sampled_from([1, 2])) for _ in range(depth)]
    pads = [draw(st.sampled_from([0, 1])) for _ in range(depth)]
    pool = draw(st.booleans())
    side = 8
    for k, s, p in zip(kernels, strides, pads, strict=True):  # every conv must fit its input
        assume(side + 2 * p >= k)
        side = (side + 2 * p - k) // s + 1
        side = side // 2 if pool and side >= 2 else side
    return dict(
        channels=channels,
        distinct=distinct,
        kernels=kernels,
        strides=strides,
        pads=pads,
        pool=pool,
        head=draw(st.sampled_from(["flatten", "global"])),
        activation=draw(st.sampled_from(["Relu", None])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(planted_conv())
def test_planted_conv_graphs_reduce_exactly(case):
    model = planted_cnn(**case)
    result = cg.condense(model, threshold=0.9999)
    assert [layer["width_after"] for layer in result.report["layers"]] == case["distinct"]
    check_full(result.model)
    x = np.random.default_rng(case["seed"]).normal(size=(2, case["channels"][0], 8, 8)).astype(np.float32)
    assert_equal_to_rounding(model, result.model, {"x": x})


ANY_OPS = [
    "Relu",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Softplus",
    "HardSwish",
    "Identity",
    "BN",
    "Dropout",
    "Residual",
    "Concat",
    "SiLU",
    "Clip6",
    "Neg",
    "Elu",
    "Selu",
    "Softsign",
    "HardSigmoid",
    "GELU",
    "PRelu",
]


@st.composite
def random_graph(draw, copies=False):
    """A dense graph of random layers, each a Gemm or MatMul+Add followed by a random op. With
    `copies`, every layer has exact copies (lambda = 1) of a few distinct neurons, threshold 1.0."""
    width = draw(st.integers(2, 8))
    layers = [
        (
            draw(st.sampled_from(["gemm", "matmul"])),
            draw(st.integers(3 if copies else 2, 10)),
            draw(st.sampled_from(ANY_OPS)),
        )
        for _ in range(draw(st.integers(1, 4)))
    ]
    distinct = [draw(st.integers(2, out - 1)) for _, out, _ in layers] if copies else None
    return dict(
        width=width,
        layers=layers,
        seed=draw(st.integers(0, 2**16)),
        threshold=1.0 if copies else draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])),
        duplicates=False if copies else draw(st.booleans()),
        distinct=distinct,
    )


def build_random(width, layers, seed, duplicates, distinct=None, copies_of=None, **_):
    """`duplicates`: the second half of each layer's neurons are positive multiples of the first
    half's weights (not biases); `distinct[i]`: layer i's neurons (weights, bias and per-channel
    constants) are exact copies of distinct[i] neurons, each used at least once. `copies_of`, a
    dict, gets each producer's `which` (row k is a copy of row which[k]) by node name."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur, cur_width = [], [], "x", width
    history = {width: ["x"]}

    def const(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    for i, (form, out, op) in enumerate(layers):
        w = rng.normal(size=(out, cur_width))
        if duplicates and out > 1:
            w[out // 2 :] = w[: out - out // 2] * rng.uniform(0.5, 2, (out - out // 2, 1))
        b = rng.normal(size=out)
        which = np.arange(out)
        if distinct is not None:  # row k is an exact copy of row which[k]
            which = np.concatenate([np.arange(distinct[i]), rng.integers(0, distinct[i], out - distinct[i])])
            rng.shuffle(which)
            w, b = w[which], b[which]
        if copies_of is not None:
            copies_of[f"fc{i}"] = which
        if form == "gemm":
            nodes.append(
                helper.make_node(
                    "Gemm", [cur, const(f"w{i}", w), const(f"b{i}", b)], [f"h{i}"], name=f"fc{i}", transB=1
                )
            )
        else:
            nodes.append(helper.make_node("MatMul", [cur, const(f"w{i}", w.T)], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", const(f"b{i}", b)], [f"h{i}"]))
        cur, cur_width = f"h{i}", out
        cur = _random_op(op, i, cur, cur_width, nodes, const, rng, history, which)
        cur_width = out * (2 if op == "Concat" else 1)
        history.setdefault(cur_width, []).append(cur)
    w = rng.normal(size=(2, cur_width))
    nodes.append(
        helper.make_node("Gemm", [cur, const("wout", w), const("bout", np.zeros(2))], ["y"], transB=1)
    )
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _random_op(op, i, cur, width, nodes, const, rng, history, which):
    """`op` after layer i's producer; per-channel constants follow `which` (channel k's original)."""
    out = f"o{i}"
    if op == "BN":
        params = (
            ("s", rng.uniform(0.5, 2, width)),
            ("t", rng.normal(size=width)),
            ("m", rng.normal(size=width)),
            ("v", rng.uniform(0.5, 2, width)),
        )
        names = [const(f"bn{i}.{k}", v[which]) for k, v in params]
        nodes.append(helper.make_node("BatchNormalization", [cur] + names, [out]))
    elif op == "PRelu":
        slope = const(f"slope{i}", rng.uniform(0.05, 0.5, width)[which])
        nodes.append(helper.make_node("PRelu", [cur, slope], [out]))
    elif op == "GELU":  # as the TorchScript exporter writes it
        nodes += [
            helper.make_node("Div", [cur, const(f"sqrt2_{i}", np.sqrt(2.0))], [f"d{i}"]),
            helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
            helper.make_node("Add", [f"e{i}", const(f"one{i}", 1.0)], [f"p{i}"]),
            helper.make_node("Mul", [cur, f"p{i}"], [f"q{i}"]),
            helper.make_node("Mul", [f"q{i}", const(f"half{i}", 0.5)], [out]),
        ]
    elif op == "Residual" and history.get(width):
        nodes.append(helper.make_node("Add", [cur, history[width][-1]], [out]))
    elif op == "Concat":
        nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
        nodes.append(helper.make_node("Concat", [cur, f"r{i}"], [out], axis=1))
    elif op == "SiLU":
        nodes.append(helper.make_node("Sigmoid", [cur], [f"s{i}"]))
        nodes.append(helper.make_node("Mul", [cur, f"s{i}"], [out]))
    elif op == "Clip6":
        nodes.append(helper.make_node("Clip", [cur, const(f"lo{i}", 0.0), const(f"hi{i}", 6.0)], [out]))
    elif op in ("Residual",):
        nodes.append(helper.make_node("Identity", [cur], [out]))
    else:
        nodes.append(helper.make_node(op, [cur], [out]))
    return out


@given(random_graph())
def test_random_graphs_stay_valid_and_run(case):
    model = build_random(**case)
    onnx.checker.check_model(model, full_check=True)
    result = cg.condense(model, threshold=case["threshold"])
    check_full(result.model)
    x = np.random.default_rng(0).normal(size=(3, case["width"])).astype(np.float32)
    expected, actual = run(model, {"x": x}), run(result.model, {"x": x})
    assert [a.shape for a in actual] == [e.shape for e in expected]
    if case["threshold"] == 1.0 and all(
        op in ("Relu", "LeakyRelu", "Identity", "Dropout") for _, _, op in case["layers"]
    ):
        assert_equal_to_rounding(model, result.model, {"x": x})


@pytest.mark.parametrize("first", ANY_OPS)
@settings(max_examples=max(5, settings().max_examples // 10))  # per op: 5 in "ci", 40 in "dev"
@given(random_graph(copies=True))
def test_random_graphs_with_exact_copies_keep_their_numbers(first, case):
    """Exact copies (lambda = 1) merge exactly through every op, homogeneous or not: each reduced
    layer lands on its planted width and the outputs equal the original's to float rounding. The
    first layer's op is every op in turn, the others are drawn."""
    (form, out, _), *rest = case["layers"]
    case = case | {"layers": [(form, out, first), *rest]}
    copies_of = {}
    model = build_random(**case, copies_of=copies_of)
    onnx.checker.check_model(model, full_check=True)
    result = cg.condense(model, threshold=1.0)
    check_full(result.model)
    for layer in result.report["layers"]:
        # a residual group's channels are copies when they are in every member (issue 13)
        members = layer["group"]["members"] if "group" in layer else [layer["name"]]
        expected = len(set(zip(*(copies_of[m] for m in members), strict=True)))
        assert layer["width_after"] == expected, (layer, case)
    x = np.random.default_rng(0).normal(size=(5, case["width"])).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=1e-5)
