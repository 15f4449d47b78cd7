"""Selection rules (`condense_graph.selectors`): each rule on small arrays with known answers, the
registry, and a fourth rule registered here that the API and the CLI take without other changes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import condense_graph as cg
from condense_graph import selectors
from condense_graph.cli import main
from condense_graph.selectors import Grouping, Rows, Selection, Selector, get_selector, register

WEIGHTS, ACTIVATIONS, MAGNITUDE = (get_selector(n) for n in ("weights", "activations", "magnitude"))


def as_lists(groups):
    return [list(map(int, g)) for g in groups]


def rows_of(vectors, *also, constants=(), gram=None) -> Rows:
    vectors = np.asarray(vectors, dtype=np.float64)
    return Rows(vectors, [vectors, *(np.asarray(v, dtype=np.float64) for v in also)], list(constants), gram)


def test_weight_cosine_groups_positive_multiples_and_may_be_exact():
    rows = rows_of([[1, 0, 1], [2, 0, 2], [0, 1, 0], [-1, 0, -1]])
    selection = WEIGHTS.select(rows, Grouping(0.95))
    assert as_lists(selection.groups) == [[0, 1], [2], [3]]  # the negative multiple stays alone
    assert selection.threshold == 0.95 and selection.factors is None and selection.merges_exactly
    np.testing.assert_allclose(selection.cosine[0], [1, 1, 0, -1], atol=1e-6)


def test_weight_cosine_asks_the_weights_without_the_bias_to_agree():
    # [w, b] cosine 0.9901 (the bias dominates), weights alone orthogonal
    rows = rows_of([[1, 0, 10], [0, 1, 10]])
    assert as_lists(WEIGHTS.select(rows, Grouping(0.95)).groups) == [[0], [1]]


def test_weight_cosine_needs_every_parallel_set_and_the_constants_to_agree():
    kernels = [[1, 0], [3, 0], [0, 1]]  # 0 and 1 parallel
    expand = [[1, 2, 0], [0, 1, 5], [1, 1, 1]]  # the rows feeding them are not (paper A.3)
    assert as_lists(WEIGHTS.select(rows_of(kernels, expand), Grouping(0.9)).groups) == [[0], [1], [2]]
    slopes = np.array([0.1, 0.2, 0.1])  # PRelu slopes 2x apart: not the same function
    selection = WEIGHTS.select(rows_of(kernels, constants=[slopes]), Grouping(0.9))
    assert as_lists(selection.groups) == [[0], [1], [2]]
    assert as_lists(WEIGHTS.select(rows_of(kernels), Grouping(0.9)).groups) == [[0, 1], [2]]


def test_weight_cosine_at_a_width_finds_the_threshold():
    rows = rows_of([[1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0.1, 1, 0]])
    selection = WEIGHTS.select(rows, Grouping(width=2))
    assert as_lists(selection.groups) == [[0, 1], [2, 3]]
    assert selection.threshold > 0.1


def test_activation_cosine_groups_by_activations_with_projection_factors():
    a = np.random.default_rng(0).normal(size=(50, 1))
    b = np.random.default_rng(1).normal(size=(50, 1))
    acts = np.hstack([a, 2 * a, b])  # channel 1 is twice channel 0, channel 2 unrelated
    rows = rows_of(np.eye(3), gram=acts.T @ acts)  # the weights say nothing here
    selection = ACTIVATIONS.select(rows, Grouping(0.99))
    assert as_lists(selection.groups) == [[0, 1], [2]]
    np.testing.assert_allclose(selection.factors, [1, 2, 1])
    assert not selection.merges_exactly and selection.threshold == 0.99
    assert ACTIVATIONS.needs_calibration and not WEIGHTS.needs_calibration


def test_magnitude_keeps_the_largest_rows_alone():
    rows = rows_of([[1, 0], [0, 3], [2, 0], [0.5, 0]])
    selection = MAGNITUDE.select(rows, Grouping(width=2))
    assert as_lists(selection.groups) == [[1], [2]]
    assert selection.threshold is None and selection.cosine is None and not selection.merges_exactly
    assert MAGNITUDE.needs_width and not WEIGHTS.needs_width


def test_depthwise_blocks_and_the_width_search_fall_back_to_the_papers_rule():
    assert ACTIVATIONS.for_layer(depthwise=True) is WEIGHTS  # blocks: paper A.3
    assert ACTIVATIONS.for_layer(depthwise=False) is ACTIVATIONS
    assert MAGNITUDE.for_layer(depthwise=True) is MAGNITUDE
    assert ACTIVATIONS.data_free() is WEIGHTS and MAGNITUDE.data_free() is MAGNITUDE


def test_registry_names_the_rules_and_refuses_others():
    assert selectors.names()[:4] == ["condense", "activations", "magnitude", "obs"]
    assert selectors.method_names()[0] == "auto"
    assert get_selector("weights") is get_selector("condense")  # the deprecated spelling
    with pytest.raises(cg.CondenseError, match="method must be 'auto', 'condense', 'activations',"):
        get_selector("cosine")


def test_calibration_statistics_are_computed_only_for_a_rule_that_needs_them(monkeypatch):
    import passes.condense_channels as pass_module

    def no_statistics(*args):
        raise AssertionError("calibration statistics computed for a rule that does not need them")

    monkeypatch.setattr(pass_module, "layer_statistics", no_statistics)
    model, data = tiny_mlp()
    # the paper's rule with data: refit, no statistics
    result = cg.condense(model, layer_widths={"fc0": 3}, calibration=data, method="condense")
    assert result.report["layers"][0]["width_after"] == 3 and result.report["layers"][0]["refit"]


# ---- a fourth rule, registered here: nothing else changes ---------------------------------------


def tiny_mlp(seed=0):
    """x[4] -> Gemm(6) -> Relu -> Gemm(2), and 64 calibration rows."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w0": rng.normal(size=(6, 4)),
        "b0": rng.normal(size=6),
        "w1": rng.normal(size=(2, 6)),
        "b1": rng.normal(size=2),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="act0"),
        helper.make_node("Gemm", ["a", "w1", "b1"], ["y"], name="fc1", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"x": rng.normal(size=(64, 4)).astype(np.float32)}


class Energy(Selector):
    """Keep the `width` channels of largest activation energy (diagonal of the Gram matrix)."""

    name = "energy"
    label = "similarity 'energy'"
    needs_calibration = True
    needs_width = True
    blocks = False

    def select(self, rows: Rows, target: Grouping) -> Selection:
        order = np.argsort(-np.diag(rows.gram), kind="stable")
        return Selection([np.array([k]) for k in sorted(order[: target.width])], None)


@pytest.fixture
def energy_rule():
    register(Energy)
    yield
    del selectors.SELECTORS["energy"]


def test_a_registered_rule_is_used_by_the_api(energy_rule):
    model, data = tiny_mlp()
    result = cg.condense(model, layer_widths={"fc0": 3}, method="energy", calibration=data)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hidden = np.maximum(data["x"] @ arrays["w0"].T + arrays["b0"], 0)
    expected = np.sort(np.argsort(-(hidden.astype(np.float64) ** 2).sum(axis=0))[:3])
    kept = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["w0"]
    np.testing.assert_array_equal(kept, arrays["w0"][expected])
    assert result.report["layers"][0]["threshold"] is None
    with pytest.raises(cg.CondenseError, match="similarity 'energy' needs calibration data"):
        cg.condense(model, layer_widths={"fc0": 3}, method="energy")
    with pytest.raises(cg.CondenseError, match="similarity 'energy' needs layer widths"):
        cg.condense(model, method="energy", calibration=data)


def test_a_registered_rule_is_a_cli_choice(energy_rule, tmp_path):
    model, data = tiny_mlp()
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "data.npz", **data)
    argv = [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--similarity", "energy", "--quiet"]
    assert main(["reduce", *argv, "--layer-width", "fc0=3", "--data", str(tmp_path / "data.npz")]) == 0
    reduced = onnx.load(tmp_path / "out.onnx")
    assert {t.name: t.dims for t in reduced.graph.initializer}["w0"] == [3, 4]
