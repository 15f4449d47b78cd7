"""The pass contract (issue 11, item 1): a pass is called on a model, returns a typed result and
never modifies its input; options are one frozen value; stage timings are part of the result."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
import pytest
from builders import planted_cnn, planted_mlp
from onnx import helper, numpy_helper

from condense_graph.calibration import Calibration
from condense_graph.plan import LayerPlan
from passes import (
    CondenseChannelsPass,
    CondenseChannelsResult,
    CondenseOptions,
    MaterializeConstantsPass,
    PassBase,
    PassResult,
)
from passes.condense_channels import STAGES


def with_constant_node(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its first initializer written as a Constant node (what exporters emit)."""
    init = model.graph.initializer[0]
    node = helper.make_node("Constant", [], [init.name], name="const0", value=init)
    del model.graph.initializer[0]
    model.graph.node.insert(0, node)
    return model


def calibration(rows: int = 96, features: int = 5) -> Calibration:
    x = np.random.default_rng(0).normal(size=(rows, features)).astype(np.float32)
    return Calibration({"x": x}, batch_size=32)


MLP = planted_mlp([5, 12, 10, 3], [4, 6], seed=3)
PASSES = {
    "condense": lambda: CondenseChannelsPass(CondenseOptions(0.9999)),
    "condense with calibration": lambda: CondenseChannelsPass(
        CondenseOptions(0.9999, calibration=calibration())
    ),
    "condense by activations": lambda: CondenseChannelsPass(
        CondenseOptions(0.99, selector="activations", calibration=calibration())
    ),
    "materialize constants": MaterializeConstantsPass,
}
MODELS = {
    "mlp": lambda: planted_mlp([5, 12, 10, 3], [4, 6], seed=3),
    "mlp with a Constant node": lambda: with_constant_node(planted_mlp([5, 12, 10, 3], [4, 6], seed=3)),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_a_pass_never_modifies_its_input(pass_name, model_name):
    model = MODELS[model_name]()
    before = model.SerializeToString(deterministic=True)
    condense = PASSES[pass_name]()
    result = condense(model)
    assert isinstance(condense, PassBase) and not condense.in_place
    assert isinstance(result, PassResult)
    assert model.SerializeToString(deterministic=True) == before
    # every pass changes these models, except that a plain MLP has no constants to materialize
    expected = pass_name != "materialize constants" or model_name != "mlp"
    assert result.modified == expected
    assert (result.model.SerializeToString(deterministic=True) != before) == expected


def test_the_input_of_a_conv_reduction_is_unchanged_too():
    model = planted_cnn([3, 8, 6], [3, 2], [3, 3], [1, 1], [1, 1], None, "global")
    before = model.SerializeToString(deterministic=True)
    assert CondenseChannelsPass(CondenseOptions(0.9999))(model).modified
    assert model.SerializeToString(deterministic=True) == before


def test_materialize_constants_reports_an_unchanged_model():
    result = MaterializeConstantsPass()(MLP)
    assert not result.modified and result.model is MLP


def test_the_result_has_typed_fields():
    result = CondenseChannelsPass(CondenseOptions(0.9999))(MLP)
    assert type(result) is CondenseChannelsResult
    assert [f.name for f in dataclasses.fields(result)] == [
        "model",
        "modified",
        "plans",
        "skipped",
        "warnings",
        "written",
        "timings",
    ]
    assert all(isinstance(p, LayerPlan) for p in result.plans) and len(result.plans) == 2
    assert [(p.cmap.width_before, p.cmap.width_after) for p in result.plans] == [(12, 4), (10, 6)]
    assert [s.name for s in result.skipped] == ["fc3"] and result.warnings == []
    assert {"fc1.weight", "fc2.weight"} <= result.written
    assert not hasattr(result, "details")


def test_timings_are_per_stage_non_negative_and_within_the_wall_time():
    start = time.perf_counter()
    result = CondenseChannelsPass(CondenseOptions(0.9999))(MLP)
    wall = time.perf_counter() - start
    assert tuple(result.timings) == STAGES == ("analyze", "plan", "rewrite")
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert sum(result.timings.values()) <= wall


def test_an_unreduced_model_still_times_every_stage():
    result = CondenseChannelsPass(CondenseOptions(1.0, selector="condense"))(
        planted_mlp([5, 6, 3], [6], seed=1)
    )
    assert not result.modified and tuple(result.timings) == STAGES


def test_options_are_frozen():
    options = CondenseOptions(0.9, layer_thresholds={"fc1": 0.8}, layer_widths={"fc2": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threshold = 0.5
    with pytest.raises(TypeError):
        options.layer_thresholds["fc1"] = 0.1
    with pytest.raises(TypeError):
        options.layer_widths["fc2"] = 1
    assert options.selector.name == "condense"


def test_options_copy_the_mappings_they_are_given():
    widths = {"fc1": 4}
    options = CondenseOptions(layer_widths=widths)
    widths["fc1"] = 1
    assert options.layer_widths["fc1"] == 4


def test_an_unknown_selector_is_refused_when_the_options_are_made():
    from condense_graph.errors import CondenseError

    with pytest.raises(CondenseError, match="method must be"):
        CondenseOptions(selector="cosine")


def test_analyze_and_plan_are_public_and_leave_the_graph_as_analyzed():
    condense = CondenseChannelsPass(CondenseOptions(0.9999, calibration=calibration()))
    graph, analysis = condense.analyze(MLP)
    before = numpy_helper.from_array(np.asarray(graph.tensors()["fc1.weight"].values)).SerializeToString()
    plans, store = condense.plan(graph, analysis, MLP)
    after = numpy_helper.from_array(np.asarray(graph.tensors()["fc1.weight"].values)).SerializeToString()
    assert after == before and store["fc1.weight"].shape == (4, 5)
    assert [p.cmap.width_after for p in plans] == [4, 6]
