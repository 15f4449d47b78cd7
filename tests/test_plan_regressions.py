"""Issue 10, items 1-5: planning and merging must never write a silently broken model.

Each test builds its pattern in code, reduces it, and checks the result against ONNX Runtime:
the whole model's outputs against the original, and every reported `block_error` against an
independent ORT measurement of the same block (the subgraph from the producer's input to the first
consumer's output, cut out of the model before and after that layer's merge) on the probe the
report documents: standard normals from `np.random.default_rng(0)`, batch 2.
"""

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, OPSET, planted_rows, run, x_to_y_model
from conftest import assert_equal_to_rounding, check_full
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg


def conv(x, w, y, name, bias=None, group=1, pad=0):
    inputs = [x, w] + ([bias] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=name, group=group, pads=[pad] * 4)


def block_output_error(
    before: onnx.ModelProto, after: onnx.ModelProto, source: str, sink: str, probe: np.ndarray
) -> dict:
    """max |after - before| and that over max |before|, of the subgraph source -> sink of each model."""
    outputs = []
    for model in (before, after):
        inferred = onnx.shape_inference.infer_shapes(model)
        block = onnx.utils.Extractor(inferred).extract_model([source], [sink])
        outputs.append(run(block, {source: probe})[0].astype(np.float64))
    err = float(np.abs(outputs[1] - outputs[0]).max())
    return {"max_abs_err": err, "max_rel_err": err / float(np.abs(outputs[0]).max())}


def probe(*shape) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same_block_error(claimed: dict, measured: dict) -> None:
    assert claimed["max_rel_err"] == pytest.approx(measured["max_rel_err"], rel=1e-3, abs=1e-6), (
        claimed,
        measured,
    )


# --- item 1: chained depthwise-separable blocks without residual ------------------------------

BLOCKS = 3
WIDE = 8


def separable_chain(rng, noise: float, pad: int, spatial) -> onnx.ModelProto:
    """x[4] -> pw0 -> Relu -> dw0 -> Relu -> pw1 -> Relu -> dw1 -> Relu -> pw2 -> ... -> pw3[3].

    pw_i projects block i-1 and expands block i. Channel q of block i copies channel
    q - shift_i (expand row times mu > 0, depthwise kernel times lam > 0), plus `noise`:
    every layer shrinks, and each later layer is planned on inputs the one before already shrank."""
    nodes, inits, cur, fan_in = [], {}, "x", 4
    for i in range(BLOCKS):
        w = rng.normal(size=(WIDE, fan_in + 1))
        k = rng.normal(size=(WIDE, 3, 3))
        copies = {0: [4, 5, 6, 7], 1: [5, 6, 7], 2: [6, 7]}[i]
        for q in copies:
            p = q - len(copies)
            w[q] = rng.uniform(0.5, 2.0) * w[p] + noise * rng.normal(size=fan_in + 1)
            k[q] = rng.uniform(0.5, 2.0) * k[p] + noise * rng.normal(size=(3, 3))
        inits |= {
            f"pw{i}.w": w[:, :-1].reshape(WIDE, fan_in, 1, 1),
            f"pw{i}.b": w[:, -1],
            f"dw{i}.w": k.reshape(WIDE, 1, 3, 3),
        }
        nodes += [
            conv(cur, f"pw{i}.w", f"e{i}", f"pw{i}", f"pw{i}.b"),
            helper.make_node("Relu", [f"e{i}"], [f"r{i}"]),
            conv(f"r{i}", f"dw{i}.w", f"d{i}", f"dw{i}", group=WIDE, pad=pad),
            helper.make_node("Relu", [f"d{i}"], [f"s{i}"]),
        ]
        cur, fan_in = f"s{i}", WIDE
    inits |= {"pw3.w": rng.normal(size=(3, WIDE, 1, 1))}
    nodes.append(conv(cur, "pw3.w", "y", "pw3"))
    side = spatial if isinstance(spatial, int) else "S"
    out_side = spatial - BLOCKS * (2 - 2 * pad) if isinstance(spatial, int) else "T"
    return x_to_y_model(nodes, inits, ["N", 4, side, side], ["N", 3, out_side, out_side])


def test_chained_separable_blocks_report_the_error_each_block_really_makes():
    """Approximate merges, static 8x8: no crash; every layer's block_error is what ORT measures on
    that block between the model reduced up to the layer before and the one reduced up to it."""
    model = separable_chain(np.random.default_rng(5), noise=0.02, pad=1, spatial=8)
    threshold = 0.99
    result = cg.condense(model, threshold=threshold)
    layers = result.report["layers"]
    assert [(layer["width_before"], layer["width_after"]) for layer in layers] == [(8, 4), (8, 5), (8, 6)]
    check_full(result.model)
    names = [layer["name"] for layer in layers]
    steps = [model]  # steps[i]: reduced up to layer i - 1 (later layers held at full width)
    for i in range(1, BLOCKS + 1):
        hold = {name: WIDE for name in names[i:]}
        steps.append(cg.condense(model, threshold=threshold, layer_widths=hold).model)
    for i, layer in enumerate(layers):
        fan_in = initializers(steps[i])[f"pw{i}.w"].shape[1]
        x = probe(2, fan_in, 8, 8)
        source, sink = "x" if i == 0 else f"s{i - 1}", f"e{i + 1}" if i + 1 < BLOCKS else "y"
        measured = block_output_error(steps[i], steps[i + 1], source, sink, x)
        assert_same_block_error(layer["block_error"], measured)
        assert 0 < measured["max_rel_err"] < np.sqrt(2 * (1 - threshold))


def test_chained_separable_blocks_with_dynamic_spatial_size_merge_exact_copies():
    """Exact copies, unpadded 3x3 depthwise kernels and a dynamic spatial size: the probes must be
    large enough for the kernels; the reduced model computes what the original does."""
    model = separable_chain(np.random.default_rng(6), noise=0.0, pad=0, spatial="S")
    result = cg.condense(model, threshold=1.0)
    layers = result.report["layers"]
    assert [(layer["width_before"], layer["width_after"]) for layer in layers] == [(8, 4), (8, 5), (8, 6)]
    assert all(layer["block_error"]["max_rel_err"] < 1e-5 for layer in layers), layers
    check_full(result.model)
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 4, 11, 11)).astype(np.float32)}
    assert_equal_to_rounding(model, result.model, feeds)


# --- item 2: a conv channel whose incoming vector is all zero ---------------------------------


def test_a_channel_zeroed_by_a_folded_batchnorm_is_removed_without_nan(rng):
    """Conv(no bias) -> Mul(s) -> Add(t) with s_2 = t_2 = 0 (an exporter's folded BN of scale 0):
    channel 2 is identically zero after the Relu. It is removed exactly; channel 4 (a planted
    multiple of channel 1) merges; nothing non-finite reaches the model."""
    w = rng.normal(size=(6, 3, 3, 3))
    s, t = rng.uniform(0.5, 2.0, 6), rng.normal(size=6)
    s[2] = t[2] = 0.0
    w[4], s[4], t[4] = w[1], 2.0 * s[1], 2.0 * t[1]  # folded vector 4 = 2 x folded vector 1
    m = x_to_y_model(
        [
            conv("x", "w", "c", "conv1", pad=1),
            helper.make_node("Mul", ["c", "s"], ["m"]),
            helper.make_node("Add", ["m", "t"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            conv("r", "w2", "y", "conv2", "b2", pad=1),
        ],
        {
            "w": w,
            "s": s.reshape(1, 6, 1, 1),
            "t": t.reshape(1, 6, 1, 1),
            "w2": rng.normal(size=(4, 6, 3, 3)),
            "b2": rng.normal(size=4),
        },
        ["N", 3, 6, 6],
        ["N", 4, 6, 6],
    )
    result = cg.condense(m, threshold=1.0)
    (layer,) = result.report["layers"]
    assert (layer["width_after"], layer["constant_removed"], layer["exact"]) == (4, 1, True)
    assert all(np.all(np.isfinite(v)) for v in initializers(result.model).values())
    assert result.report["params_after"] < result.report["params_before"]
    check_full(result.model)
    feeds = {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)}
    assert np.all(np.isfinite(run(result.model, feeds)[0]))
    assert_equal_to_rounding(m, result.model, feeds)


# --- item 3: the bias must not decide the cosine alone -----------------------------------------


def test_small_kernels_with_large_biases_are_not_called_parallel(rng):
    """First conv on raw 0..255 pixels: kernels |w| ~ 0.01 with unrelated directions, biases 2-4.
    The [w, b] cosines are all >= 0.999, the kernels' are not: only the planted real multiple
    (channel 7 = 3 x channel 0) may merge, and the merge must be exact on pixel inputs."""
    w = 0.01 * rng.normal(size=(8, 3, 3, 3))
    b = rng.uniform(2.0, 4.0, 8)
    w[7], b[7] = 3.0 * w[0], 3.0 * b[0]
    m = x_to_y_model(
        [
            conv("x", "w", "c", "conv1", "b", pad=1),
            helper.make_node("Relu", ["c"], ["r"]),
            conv("r", "w2", "y", "conv2", "b2", pad=1),
        ],
        {"w": w, "b": b, "w2": rng.normal(size=(4, 8, 3, 3)), "b2": rng.normal(size=4)},
        ["N", 3, 8, 8],
        ["N", 4, 8, 8],
    )
    rows = np.c_[w.reshape(8, -1), b]
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert (unit @ unit.T).min() > 0.999  # the full cosine alone would merge everything
    result = cg.condense(m, threshold=0.999)
    (layer,) = result.report["layers"]
    assert (layer["width_after"], layer["exact"]) == (7, True)
    assert layer["min_group_cosine"] > 1 - 1e-6
    feeds = {"x": rng.integers(0, 256, size=(2, 3, 8, 8)).astype(np.float32)}
    assert_equal_to_rounding(m, result.model, feeds)


# --- item 4: PRelu slopes are part of what a channel computes ---------------------------------


def prelu_mlp(rng, slopes) -> onnx.ModelProto:
    """Gemm 4 -> 6 (three pairs of exact positive multiples) -> PRelu(slopes) -> Gemm 6 -> 3."""
    base = rng.normal(size=(3, 5))
    rows = base[[0, 0, 1, 1, 2, 2]] * np.array([1.0, 2.0, 1.0, 0.5, 1.0, 3.0])[:, None]
    return x_to_y_model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("PRelu", ["h", "slope"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        {
            "w1": rows[:, :4],
            "b1": rows[:, 4],
            "slope": np.asarray(slopes),
            "w2": rng.normal(size=(3, 6)),
            "b2": rng.normal(size=3),
        },
        ["N", 4],
        ["N", 3],
    )


def test_prelu_channels_with_opposite_slopes_never_merge(rng):
    """Pair (0, 1): slopes of opposite sign, never merged. Pair (2, 3): equal slopes, exact merge.
    Pair (4, 5): slopes 1e-4 apart: merged at 0.999 (approximate, its error measured), not at 1.0."""
    m = prelu_mlp(rng, [0.2, -0.3, 0.1, 0.1, 0.25, 0.2501])
    exact = cg.condense(m, threshold=1.0)
    (layer,) = exact.report["layers"]
    assert (layer["width_after"], layer["exact"]) == (5, True)
    feeds = {"x": rng.normal(size=(64, 4)).astype(np.float32)}
    assert_equal_to_rounding(m, exact.model, feeds)
    loose = cg.condense(m, threshold=0.999)
    (layer,) = loose.report["layers"]
    assert (layer["width_after"], layer["exact"]) == (4, False)
    measured = block_output_error(m, loose.model, "x", "y", probe(2, 4))
    assert_same_block_error(layer["block_error"], measured)
    assert 0 < measured["max_rel_err"] < 1e-3


# --- item 5: depthwise blocks group on the depthwise kernels and the expand rows --------------


def separable_block(expand, kernels, project, activation="Relu", pad=2) -> onnx.ModelProto:
    """x[4] -> 1x1 expand (bias) -> act -> depthwise (no bias) -> act -> 1x1 project -> y."""
    width, k = kernels.shape[0], kernels.shape[-1]
    act = (
        (lambda i, o: helper.make_node("Clip", [i, "zero", "six"], [o]))
        if activation == "Clip"
        else (lambda i, o: helper.make_node("Relu", [i], [o]))
    )
    return x_to_y_model(
        [
            conv("x", "we", "e", "expand", "be"),
            act("e", "r"),
            conv("r", "wd", "d", "dw", group=width, pad=pad),
            act("d", "s"),
            conv("s", "wp", "y", "project"),
        ],
        {
            "we": expand[:, :-1].reshape(width, -1, 1, 1),
            "be": expand[:, -1],
            "wd": kernels.reshape(width, 1, k, k),
            "wp": project.reshape(-1, width, 1, 1),
            "zero": np.float32(0.0),
            "six": np.float32(6.0),
        },
        ["N", expand.shape[1] - 1, 6, 6],
        ["N", project.shape[0], 6, 6],
    )


def test_single_tap_depthwise_kernels_do_not_merge_unrelated_expand_rows(rng):
    """5x5 kernels zero but for the centre: every pair of kernels is parallel. Only channel 5
    (expand row = row 1, kernel = 0.5 x kernel 1) really copies another; the rest must stay."""
    kernels = np.zeros((8, 5, 5))
    kernels[:, 2, 2] = rng.uniform(0.5, 2.0, 8)
    expand = rng.normal(size=(8, 5))
    expand[5], kernels[5] = expand[1], 0.5 * kernels[1]
    m = separable_block(expand, kernels, rng.normal(size=(4, 8)))
    result = cg.condense(m, threshold=0.999)
    (layer,) = result.report["layers"]
    assert layer["width_after"] == 7
    measured = block_output_error(m, result.model, "x", "y", probe(2, 4, 6, 6))
    assert_same_block_error(layer["block_error"], measured)
    assert measured["max_rel_err"] < 1e-5
    assert_equal_to_rounding(m, result.model, {"x": rng.normal(size=(2, 4, 6, 6)).astype(np.float32)})


def test_a_block_merge_that_breaks_the_budget_is_rolled_back(rng):
    """ReLU6 blocks: expand rows 4 x apart and equal kernels are parallel, but ReLU6 saturates,
    so the merged block is far from the original: the merge is measured, rejected and not applied."""
    kernels = rng.normal(size=(6, 3, 3))
    expand = rng.normal(size=(6, 5))
    expand[3:], kernels[3:] = 4.0 * expand[:3], kernels[:3]
    m = separable_block(expand, kernels, rng.normal(size=(4, 6)), activation="Clip", pad=1)
    result = cg.condense(m, threshold=0.999)
    (layer,) = result.report["layers"]
    assert layer["width_after"] == 6 and "budget" in layer["rejected"], layer
    assert result.report["params_after"] == result.report["params_before"]
    feeds = {"x": rng.normal(size=(2, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(m, feeds)[0])


def test_an_unreduced_depthwise_block_gains_no_bias_when_another_layer_is_reduced():
    """Issue 11: expand 4->8 (no bias) -> Relu -> depthwise 8 -> Relu -> project 6 (3 planted
    directions) -> Relu -> head. Only the project layer reduces (6 -> 3); planning must not leave
    an all-zero bias on the untouched expand conv (170 -> 137 parameters, not 145)."""
    rng = np.random.default_rng(7)
    project = planted_rows(rng, 6, 3, 8)
    inits = {
        "expand.w": rng.normal(size=(8, 4, 1, 1)),
        "dw.w": rng.normal(size=(8, 1, 3, 3)),
        "project.w": project[:, :-1].reshape(6, 8, 1, 1),
        "project.b": project[:, -1],
        "head.w": rng.normal(size=(2, 6, 1, 1)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "expand.w"], ["e"], name="expand"),
        helper.make_node("Relu", ["e"], ["e_act"]),
        helper.make_node(
            "Conv", ["e_act", "dw.w"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["d"], ["d_act"]),
        helper.make_node("Conv", ["d_act", "project.w", "project.b"], ["p"], name="project"),
        helper.make_node("Relu", ["p"], ["p_act"]),
        helper.make_node("Conv", ["p_act", "head.w"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "dw_no_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    result = cg.condense(model, threshold=0.9999)
    widths = {
        layer["name"]: (layer["width_before"], layer["width_after"]) for layer in result.report["layers"]
    }
    assert widths == {"expand": (8, 8), "project": (6, 3)}, widths
    assert (result.report["params_before"], result.report["params_after"]) == (170, 137)
    expand = next(n for n in result.model.graph.node if n.name == "expand")
    assert len(expand.input) == 2  # still no bias
    x = rng.normal(size=(1, 4, 6, 6)).astype(np.float32)
    assert_equal_to_rounding(model, result.model, {"x": x})


def test_a_layer_whose_outgoing_weights_are_all_zero_counts_the_kept_channel():
    """Review: every channel has zero outgoing weights; one is kept, 7 (not 8) are removed."""
    from builders import planted_mlp
    from onnx import numpy_helper as nh

    model = planted_mlp([5, 8, 3], [8])
    weight = next(t for t in model.graph.initializer if t.name == "fc2.weight")
    weight.CopyFrom(nh.from_array(np.zeros((3, 8), np.float32), "fc2.weight"))
    layer = cg.condense(model, threshold=0.95).report["layers"][0]
    assert (layer["width_after"], layer["constant_removed"], layer["zero_output_removed"]) == (1, 0, 7)


@pytest.mark.parametrize("activation", ["Tanh", "Elu"])
def test_dropping_identically_zero_conv_channels_is_exact_for_any_activation(activation):
    """Review: a BN with scale 0 and shift 0 zeroes channels 2 and 3; dropping them changes
    nothing, so the layer is exact although Tanh/Elu are not homogeneous (Tanh(0) = Elu(0) = 0)."""
    rng = np.random.default_rng(0)
    gamma, beta = np.ones(6), rng.normal(size=6)
    gamma[2:4] = beta[2:4] = 0
    inits = {
        "W": rng.normal(size=(6, 3, 3, 3)),
        "g": gamma,
        "be": beta,
        "mu": np.zeros(6),
        "var": np.ones(6),
        "W2": rng.normal(size=(4, 6, 3, 3)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"]),
        helper.make_node(activation, ["bn"], ["a"]),
        helper.make_node("Conv", ["a", "W2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "zero_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    result = cg.condense(model, threshold=0.9999)
    layer = result.report["layers"][0]
    assert (layer["width_after"], layer["constant_removed"], layer["exact"]) == (4, 2, True)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    assert_equal_to_rounding(model, result.model, {"x": x})
