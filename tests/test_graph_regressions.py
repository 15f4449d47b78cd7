"""Real exporters' graphs that loading, folding or analysis used to break or refuse (issue 10, items 6-10).

Every model is built in code with onnx.helper and holds planted exact copies, so the reduced width is
known and the reduced model must compute the original's outputs to float rounding (ONNX Runtime).
"""

import warnings

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, OPSET, planted_rows, run
from conftest import assert_equal_to_rounding, assert_same_outputs, check_full
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg
from condense_graph.graph import export_like, import_graph
from condense_graph.report import count_params
from passes.materialize_constants import materialize_constants


def f32(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def make_model(nodes, inits, inputs, outputs, opset=OPSET):
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def copies(rng, width, distinct, fan_in):
    """[width, fan_in + 1] rows (weights | bias), each an exact copy of one of `distinct` rows, and
    which row each one copies."""
    base = rng.normal(size=(distinct, fan_in + 1)).astype(np.float32)
    which = np.concatenate([np.arange(distinct), rng.integers(0, distinct, width - distinct)])
    return base[which], which


def assert_sizes_are_the_truth(original, result):
    report = result.report
    assert report["params_before"] == count_params(original)
    assert report["params_after"] == count_params(result.model)
    assert report["file_size_before"] == len(original.SerializeToString())
    assert report["file_size_after"] == len(result.model.SerializeToString())


# ---- 6: If with two outputs and a condition that folds -----------------------------------------


def branch(tag, rng):
    """A branch returning two outputs computed from the outer 'h2', with a weight of its own
    (a Constant node) and a subgraph initializer."""
    const = helper.make_node(
        "Constant", [], [f"{tag}.scale"], value=numpy_helper.from_array(rng.normal(size=5).astype(np.float32))
    )
    nodes = [
        const,
        helper.make_node("Mul", ["h2", f"{tag}.scale"], [f"{tag}.o1"]),
        helper.make_node("Add", ["h2", f"{tag}.shift"], [f"{tag}.o2"]),
    ]
    return helper.make_graph(
        nodes,
        tag,
        [],
        [value(f"{tag}.o1", None), value(f"{tag}.o2", None)],
        [f32(f"{tag}.shift", rng.normal(size=5))],
    )


def if_with_two_outputs(rng):
    """fc1 (12 planted rows, 4 distinct) -> Relu -> fc2 -> If(Shape(x)[0] == 2) with two outputs."""
    rows = planted_rows(rng, 12, 4, 6)
    inits = [
        f32("fc1.w", rows[:, :-1]),
        f32("fc1.b", rows[:, -1]),
        f32("fc2.w", rng.normal(size=(5, 12))),
        f32("fc2.b", rng.normal(size=5)),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "fc2.w", "fc2.b"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Equal", ["batch", "two"], ["cond"]),
        helper.make_node(
            "If", ["cond"], ["y1", "y2"], then_branch=branch("then", rng), else_branch=branch("else", rng)
        ),
    ]
    return make_model(nodes, inits, [value("x", [2, 6])], [value("y1", [2, 5]), value("y2", [2, 5])])


def test_if_with_two_outputs_and_a_constant_condition_stays_valid(rng):
    model = if_with_two_outputs(rng)
    result = cg.condense(model, threshold=0.9999)
    check_full(result.model)
    assert [(layer["name"], layer["width_after"]) for layer in result.report["layers"]] == [("fc1", 4)]
    # the branches' signed constants defeat the |W| |x| rounding bound: 1e-5 of each output's scale
    assert_same_outputs(model, result.model, {"x": rng.normal(size=(2, 6)).astype(np.float32)})
    # main graph 12*6+12 + 5*12+5 + 2 scalars, each branch 5 + 5 (Constant node, initializer)
    assert count_params(model) == 151 + 2 * 10
    assert result.report["params_after"] < result.report["params_before"]
    assert_sizes_are_the_truth(model, result)


# ---- 7: Conv -> BatchNormalization with [C] parameters on NCHW data ----------------------------


def conv_bn_relu_conv(rng, width=8, distinct=3):
    """Conv 3->8 (3x3, exact copies of 3 kernels with their biases) -> BN (parameters copied with
    the kernels) -> Relu -> Conv 8->4."""
    rows, which = copies(rng, width, distinct, 3 * 9)
    distinct_bn = {
        "bn.scale": rng.uniform(0.5, 2, distinct),
        "bn.B": rng.normal(size=distinct),
        "bn.mean": rng.normal(size=distinct),
        "bn.var": rng.uniform(0.5, 2, distinct),
    }
    bn = {k: v[which] for k, v in distinct_bn.items()}
    inits = [
        f32("c1.w", rows[:, :-1].reshape(width, 3, 3, 3)),
        f32("c1.b", rows[:, -1]),
        f32("c2.w", rng.normal(size=(4, width, 1, 1))),
        f32("c2.b", rng.normal(size=4)),
    ]
    inits += [f32(k, v) for k, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", *bn], ["n1"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["y"], name="c2"),
    ]
    return make_model(nodes, inits, [value("x", ["N", 3, 6, 6])], [value("y", ["N", 4, 6, 6])])


def test_conv_then_unfolded_batchnorm_reduces_exactly(rng):
    model = conv_bn_relu_conv(rng)
    result = cg.condense(model, threshold=0.9999)
    assert "c1" not in [s["name"] for s in result.report["skipped"]]
    assert [(layer["name"], layer["width_after"], layer["exact"]) for layer in result.report["layers"]] == [
        ("c1", 3, True)
    ]
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})
    # c1 8*27+8, BN 4*8, c2 4*8+4  ->  c1 3*27+3, BN 4*3, c2 4*3+4
    assert (result.report["params_before"], result.report["params_after"]) == (292, 112)


def test_batchnorm_on_sequence_features_is_refused(rng):
    """[N, S, C] dense data: BN normalizes axis 1 (S), not the channels: the layer is left alone."""
    rows, _ = copies(rng, 4, 2, 6)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("BatchNormalization", ["h", "s", "t", "m", "v"], ["n"], name="bn"),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2"),
    ]
    inits = [f32("w1", rows[:, :-1].T), f32("w2", rng.normal(size=(4, 3)))] + [
        f32(k, np.ones(4)) for k in "stmv"
    ]
    model = make_model(nodes, inits, [value("x", ["N", 4, 6])], [value("y", ["N", 4, 3])])
    result = cg.condense(model, threshold=0.9999)
    assert result.report["layers"] == []
    assert "channel axis is not ours" in result.report["skipped"][0]["reason"]


# ---- 8: CastLike of constants (dynamo exporter, optimize=False) -------------------------------


def dynamo_style_conv_clip_conv(rng, width=8, distinct=3):
    """Conv without bias initializer: bias = Expand(CastLike(0, x), Shape(w)[0:1]);
    Clip(min=CastLike(0, c), max=CastLike(6, c)); then Conv."""
    rows, _ = copies(rng, width, distinct, 3 * 9)
    inits = [
        f32("c1.w", rows[:, :-1].reshape(width, 3, 3, 3)),
        f32("c2.w", rng.normal(size=(4, width, 1, 1))),
        f32("c2.b", rng.normal(size=4)),
    ]

    def constant(name, values, dtype=np.float32):
        tensor = numpy_helper.from_array(np.array(values, dtype))
        return helper.make_node("Constant", [], [name], value=tensor)

    nodes = [
        helper.make_node("Shape", ["c1.w"], ["wshape"], start=0, end=1),
        constant("zero", 0.0),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "wshape"], ["bias"]),
        helper.make_node("Conv", ["x", "c1.w", "bias"], ["c1"], name="c1", kernel_shape=[3, 3]),
        constant("lo", 0.0, np.float64),
        helper.make_node("CastLike", ["lo", "c1"], ["lo_like"]),
        constant("hi", 6.0, np.float64),
        helper.make_node("CastLike", ["hi", "c1"], ["hi_like"]),
        helper.make_node("Clip", ["c1", "lo_like", "hi_like"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["y"], name="c2"),
    ]
    return make_model(nodes, inits, [value("x", ["N", 3, 6, 6])], [value("y", ["N", 4, 4, 4])], opset=18)


def test_castlike_bounds_and_expanded_bias_are_folded(rng):
    model = dynamo_style_conv_clip_conv(rng)
    result = cg.condense(model, threshold=0.9999)
    assert "c1" not in [s["name"] for s in result.report["skipped"]]
    assert [
        (layer["name"], layer["activation"], layer["width_after"]) for layer in result.report["layers"]
    ] == [("c1", "Clip", 3)]
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})
    # c1 8*27 -> 3*27 and no bias (the Expand of zeros is dropped), c2 4*8+4 -> 4*3+4, 2 Clip bounds
    assert (result.report["params_before"], result.report["params_after"]) == (255, 99)
    assert [list(t.dims) for t in result.model.graph.initializer if t.name.startswith("c1")] == [[3, 3, 3, 3]]
    assert_sizes_are_the_truth(model, result)


def test_scalars_folded_from_one_constant_are_not_duplicated(rng):
    """Dynamo writes one CastLike per use of a constant: two ReLU6 bounds from the same two Constant
    nodes fold into four scalars unless folding's copies are deduplicated (2 stored, 2 written)."""
    rows, _ = copies(rng, 8, 3, 3 * 9)
    inits = [
        f32("c1.w", rows[:, :-1].reshape(8, 3, 3, 3)),
        f32("c1.b", rows[:, -1]),
        f32("c2.w", rng.normal(size=(6, 8, 1, 1))),
        f32("c3.w", rng.normal(size=(4, 6, 1, 1))),
    ]
    lo = helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(0.0)))
    hi = helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(6.0)))
    nodes = [lo, hi, helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", kernel_shape=[3, 3])]
    for i, (src, out) in enumerate([("c1", "r1"), ("c2", "r2")]):
        nodes += [
            helper.make_node("CastLike", ["lo", src], [f"lo{i}"]),
            helper.make_node("CastLike", ["hi", src], [f"hi{i}"]),
            helper.make_node("Clip", [src, f"lo{i}", f"hi{i}"], [out], name=f"relu6_{i}"),
        ]
        if src == "c1":
            nodes.append(helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="c2"))
    nodes.append(helper.make_node("Conv", ["r2", "c3.w"], ["y"], name="c3"))
    model = make_model(nodes, inits, [value("x", ["N", 3, 6, 6])], [value("y", ["N", 4, 4, 4])], opset=18)
    result = cg.condense(model, threshold=0.9999)
    assert [(layer["name"], layer["width_after"]) for layer in result.report["layers"]] == [
        ("c1", 3),
        ("c2", 6),
    ]
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})
    scalars = [t for t in result.model.graph.initializer if not t.dims]
    assert len(scalars) == 2, [t.name for t in scalars]
    # c1 8*27+8 -> 3*27+3, c2 6*8 -> 6*3, c3 24, and the 2 bounds
    assert (result.report["params_before"], result.report["params_after"]) == (298, 128)


# ---- 9: Clip(x, min, +inf) ---------------------------------------------------------------------


def gemm_clip_gemm(rng, low=0.0, high=np.inf):
    rows = planted_rows(rng, 12, 4, 6)
    inits = [
        f32("fc1.w", rows[:, :-1]),
        f32("fc1.b", rows[:, -1]),
        f32("lo", low),
        f32("hi", high),
        f32("fc2.w", rng.normal(size=(3, 12))),
        f32("fc2.b", rng.normal(size=3)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"], transB=1, name="fc1"),
        helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="clamp"),
        helper.make_node("Gemm", ["a", "fc2.w", "fc2.b"], ["y"], transB=1, name="fc2"),
    ]
    return make_model(nodes, inits, [value("x", ["N", 6])], [value("y", ["N", 3])])


def test_clip_with_an_infinite_upper_bound_reduces(rng):
    model = gemm_clip_gemm(rng)
    result = cg.condense(model, threshold=0.9999)
    assert [(layer["name"], layer["width_after"], layer["exact"]) for layer in result.report["layers"]] == [
        ("fc1", 4, True)
    ]
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, {"x": rng.normal(size=(5, 6)).astype(np.float32)})
    # 12*6+12 + 2 + 3*12+3  ->  4*6+4 + 2 + 3*4+3
    assert (result.report["params_before"], result.report["params_after"]) == (125, 45)


def test_non_finite_weights_the_pass_reads_skip_the_layer_and_name_the_tensor(rng):
    model = gemm_clip_gemm(rng)
    weight = numpy_helper.to_array(model.graph.initializer[4]).copy()
    weight[1, 2] = np.nan
    model.graph.initializer[4].CopyFrom(f32("fc2.w", weight))
    result = cg.condense(model, threshold=0.9999)
    assert result.report["layers"] == [] and result.model is not None
    reasons = [s["reason"] for s in result.report["skipped"]]
    assert any("'fc2.w'" in r and "NaN or Inf" in r for r in reasons), reasons


# ---- 10: initializers shared through Identity nodes (TorchScript exporter) ---------------------


def shared_through_identity(rng, reducible=True):
    """x -> fc1 (planted) -> Relu -> fc2 -> y, and a wide weight 'shared.w' reaching two Gemms through
    Identity nodes (fcA -> Relu -> fcB: reducible copies if it were not shared)."""
    rows = planted_rows(rng, 12, 4 if reducible else 12, 6)
    wide, _ = copies(rng, 16, 2, 40)
    inits = [
        f32("fc1.w", rows[:, :-1]),
        f32("fc1.b", rows[:, -1]),
        f32("fc2.w", rng.normal(size=(3, 12))),
        f32("fc2.b", rng.normal(size=3)),
        f32("shared.w", wide[:, :-1]),
        f32("fcB.w", rng.normal(size=(3, 16))),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "fc2.w", "fc2.b"], ["y"], transB=1, name="fc2"),
        helper.make_node("Identity", ["shared.w"], ["wA"]),
        helper.make_node("Identity", ["shared.w"], ["wC"]),
        helper.make_node("Gemm", ["z", "wA"], ["hA"], transB=1, name="fcA"),
        helper.make_node("Relu", ["hA"], ["aA"]),
        helper.make_node("Gemm", ["aA", "fcB.w"], ["yB"], transB=1, name="fcB"),
        helper.make_node("Gemm", ["z", "wC"], ["yC"], transB=1, name="fcC"),
    ]
    return make_model(
        nodes,
        inits,
        [value("x", ["N", 6]), value("z", ["N", 40])],
        [value("y", ["N", 3]), value("yB", ["N", 3]), value("yC", ["N", 16])],
    )


def feeds_xz(rng):
    return {"x": rng.normal(size=(4, 6)).astype(np.float32), "z": rng.normal(size=(4, 40)).astype(np.float32)}


def test_weight_shared_through_identity_is_not_duplicated(rng):
    model = shared_through_identity(rng)
    result = cg.condense(model, threshold=0.9999)
    assert [(layer["name"], layer["width_after"]) for layer in result.report["layers"]] == [("fc1", 4)]
    assert any(s["name"] == "fcA" and "shared" in s["reason"] for s in result.report["skipped"])
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, feeds_xz(rng))
    # fc1 12*6+12 -> 4*6+4, fc2 3*12+3 -> 3*4+3; shared.w (640) and fcB.w (48) once each
    assert (result.report["params_before"], result.report["params_after"]) == (123 + 688, 43 + 688)
    assert result.report["file_size_after"] < result.report["file_size_before"]
    assert_sizes_are_the_truth(model, result)


def test_nothing_reducible_with_identity_sharing_does_not_grow(rng):
    model = shared_through_identity(rng, reducible=False)
    result = cg.condense(model, threshold=0.9999)
    assert result.report["layers"] == [] or all(
        layer["width_after"] == layer["width_before"] for layer in result.report["layers"]
    )
    assert result.report["params_after"] <= result.report["params_before"]
    assert result.report["file_size_after"] <= result.report["file_size_before"]
    assert_equal_to_rounding(model, result.model, feeds_xz(rng))


# ---- 7 + 8 as exported: unfolded BN (TorchScript, no constant folding; dynamo, no optimizer) ------


def test_torch_exports_with_unfolded_batchnorm_reduce_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from test_mobilenet import copy_channel
    from torch_models import randomize_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 4, 1),
    )
    randomize_batchnorm(net, torch.Generator().manual_seed(1))
    for p, q in ((0, 5), (1, 6), (1, 7)):  # 8 channels, 5 distinct
        copy_channel(p, q, net[0], net[1])
    x = torch.randn(2, 3, 6, 6)
    feeds = {"x": x.numpy()}
    for dynamo in (False, True):
        path = tmp_path / f"net_{dynamo}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {"optimize": False} if dynamo else {"do_constant_folding": False}
            torch.onnx.export(
                net.eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=dynamo, **kwargs
            )
        model = onnx.load(str(path))
        assert "BatchNormalization" in [n.op_type for n in model.graph.node]
        result = cg.condense(model, threshold=1.0)
        assert [layer["width_after"] for layer in result.report["layers"]] == [5], (
            dynamo,
            result.report["skipped"],
        )
        check_full(result.model)
        assert_same_outputs(model, result.model, feeds)
        # conv 8*27 -> 5*27, BN 4*8 -> 4*5, head 4*8 -> 4*5 (+ the exporters' scalars)
        # conv 8*27 -> 5*27, BN 4*8 -> 4*5, head 4*8 -> 4*5: 105 fewer (the dynamo export's bias
        # Expand(CastLike(0, x), [8]) folds into zeros, which are dropped: not 5 more parameters;
        # its scalars fold into the Clip bounds)
        params = result.report["params_before"], result.report["params_after"]
        assert params == ((285, 181) if dynamo else (286, 181))
        assert_sizes_are_the_truth(model, result)


def test_identity_of_a_constant_read_inside_if_branches_is_folded_validly(rng):
    """The Identity's users inside both branches (and an Identity inside a branch) read the outer
    initializer; an Identity that is a graph output stays an output."""
    then = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "wI"], ["t"]),
            helper.make_node("Identity", ["wI"], ["wII"]),
            helper.make_node("Add", ["t", "wII"], ["t2"]),
        ],
        "then",
        [],
        [value("t2", None)],
    )
    other = helper.make_graph([helper.make_node("Add", ["x", "wI"], ["e"])], "else", [], [value("e", None)])
    nodes = [
        helper.make_node("Identity", ["w"], ["wI"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Identity", ["w"], ["y2"]),
    ]
    model = make_model(
        nodes,
        [f32("w", rng.normal(size=4)), f32("zero", 0.0)],
        [value("x", [2, 4])],
        [value("y", [2, 4]), value("y2", [4])],
    )
    graph = import_graph(model)
    materialize_constants(graph)
    folded = export_like(graph, model)
    check_full(folded)
    assert "Identity" not in [n.op_type for g in _graphs(folded.graph) for n in g.node]
    x = rng.normal(size=(2, 4)).astype(np.float32)
    for feeds in ({"x": np.abs(x)}, {"x": -np.abs(x)}):  # both branches
        for expected, actual in zip(run(model, feeds), run(folded, feeds), strict=True):
            np.testing.assert_array_equal(actual, expected)


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)


def test_an_inf_bound_folded_from_a_double_constant_is_not_called_ours(rng):
    """Clip(x, 0, CastLike(Constant(inf, double), x)) (dynamo without optimizer) folds into a float32
    Inf: the same value as the input's, so the safety net must not refuse the reduced model."""
    model = gemm_clip_gemm(rng)
    kept = [t for t in model.graph.initializer if t.name != "hi"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["hi64"], value=numpy_helper.from_array(np.array(np.inf)))
    )
    model.graph.node.insert(2, helper.make_node("CastLike", ["hi64", "h"], ["hi"]))
    model.opset_import[0].version = 18
    result = cg.condense(model, threshold=0.9999)
    assert [(layer["name"], layer["width_after"]) for layer in result.report["layers"]] == [("fc1", 4)]
    check_full(result.model)
    assert_equal_to_rounding(model, result.model, {"x": rng.normal(size=(5, 6)).astype(np.float32)})
