"""Issue 10, items 11-15: never a silently broken model.

Each test is a regression test through the command line (`condense_graph.cli.main`, and subprocess
runs for exit codes and tracebacks); the numbers the tool reports are recomputed here with ONNX
Runtime and numpy.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, OPSET, planted_mlp, run
from conftest import message_lines
from onnx import TensorProto, helper, numpy_helper

import condense_graph.api as api
from condense_graph.cli import main
from passes.condense_channels import CondenseChannelsPass


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


def replace_initializer(model, name, values):
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))


def array(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def one_line(err: str) -> str:
    lines = message_lines(err)
    assert len(lines) == 1, err
    return lines[0]


# ---- 11: every written model passes the full checker, loads in ORT, has finite weights --------


def nan_weight(model):
    values = array(model, "fc2.weight").copy()
    values[0, 0] = np.nan
    replace_initializer(model, "fc2.weight", values)


def dangling_input(model):
    model.graph.node[-1].input[0] = "no_such_tensor"


def unknown_to_onnxruntime(model):
    # a valid graph (custom domains are not schema-checked) that ONNX Runtime has no kernel for
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("Mystery", ["pre"], [out], domain="com.example"))


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (nan_weight, "NaN/Inf weights ('fc2.weight': 1 of"),
        (dangling_input, "fails onnx.checker"),
        (unknown_to_onnxruntime, "ONNX Runtime cannot load"),
    ],
)
def test_a_broken_result_is_never_written_and_exits_3(corrupt, reason, tmp_path, monkeypatch, capsys):
    class CorruptingPass(CondenseChannelsPass):  # stands for a bug in the pass
        def __call__(self, model):
            result = super().__call__(model)
            corrupt(result.model)
            return result

    monkeypatch.setattr(api, "CondenseChannelsPass", CorruptingPass)
    source = save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), tmp_path / "m.onnx")
    before = open(source, "rb").read()
    out = tmp_path / "o.onnx"
    code = main(["reduce", source, str(out), "--threshold", "0.9999"])
    assert code == 3
    line = one_line(capsys.readouterr().err)
    assert "internal error (a bug in condense-graph" in line and reason in line
    assert "nothing was written" in line
    assert not out.exists() and open(source, "rb").read() == before
    from condense_graph.errors import InternalError

    with pytest.raises(InternalError, match="a bug in condense-graph"):  # API users are protected too
        api.condense(source, threshold=0.9999)


def test_an_input_that_fails_the_full_check_is_refused_not_written(tmp_path, capsys):
    model = planted_mlp([5, 12, 3], [4])
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7  # it computes 3 columns
    onnx.checker.check_model(model)  # the plain checker passes, strict shape inference does not
    source, out = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    assert main(["reduce", source, str(out), "--threshold", "0.9999"]) == 2
    assert "onnx.checker" in one_line(capsys.readouterr().err) and not out.exists()


def test_an_inf_tensor_copied_from_the_input_is_allowed():
    from condense_graph.errors import InternalError
    from condense_graph.safety import check_output

    model = planted_mlp([5, 12, 3], [4])
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.inf, np.float32), "clip_max"))
    model.graph.node.insert(1, helper.make_node("Clip", ["fc1_out", "", "clip_max"], ["clipped"]))
    model.graph.node[2].input[0] = "clipped"
    assert check_output(model, model) == {"checker": "full", "onnxruntime": "loads", "finite_weights": True}
    made = onnx.ModelProto()
    made.CopyFrom(model)
    replace_initializer(made, "clip_max", np.float32(-np.inf))  # not the input's tensor: ours
    with pytest.raises(InternalError, match="'clip_max': 1 of 1 values"):
        check_output(made, model)


# ---- 12: verification fails by default; NaN/Inf fail; element-wise relative error --------------


def classifier_pair(kind):
    """The reference model and a 'reduced' one: output scaled by 0.1 (cosine 1, rel err 0.9), the
    last layer mixed with a random one (cosine about 0.38), or NaN / Inf in one output column."""
    model = planted_mlp([6, 12, 4], [5], seed=1)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w, b = array(model, "fc2.weight"), array(model, "fc2.bias")
    if kind == "scaled":
        replace_initializer(other, "fc2.weight", 0.1 * w)
        replace_initializer(other, "fc2.bias", 0.1 * b)
    elif kind == "mixed":
        rng = np.random.default_rng(7)
        replace_initializer(other, "fc2.weight", w + rng.normal(size=w.shape) * np.abs(w).mean())
    else:  # Sqrt(-1) = NaN, 1/0 = Inf, from finite weights, in column 0 only
        op, column = ("Sqrt", [-1, 0, 0, 0]) if kind == "nan" else ("Reciprocal", [0, 1e30, 1e30, 1e30])
        other.graph.initializer.append(numpy_helper.from_array(np.array(column, np.float32), "c"))
        out = other.graph.output[0].name
        other.graph.node[-1].output[0] = "pre"
        other.graph.node.extend(
            [helper.make_node(op, ["c"], ["bad"]), helper.make_node("Add", ["pre", "bad"], [out])]
        )
    return model, other


def errors(expected, actual):
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    diff = np.abs(e - a)
    return {
        "max_abs_err": diff.max(),
        "max_rel_err": diff.max() / np.abs(e).max(),
        "max_elem_rel_err": (diff / (np.abs(e) + 1e-6)).max(),
        "cosine": np.sum(e * a) / np.sqrt(np.sum(e * e) * np.sum(a * a)),
    }


@pytest.mark.parametrize(
    "kind,breach", [("scaled", "max_rel_err 0.9 > rtol 0.001"), ("mixed", "< min-cosine 0.9999")]
)
def test_verify_fails_by_default(kind, breach, tmp_path, capsys):
    model, other = classifier_pair(kind)
    a, b, data, report = (
        save(model, tmp_path / "a.onnx"),
        save(other, tmp_path / "b.onnx"),
        tmp_path / "d.npz",
        tmp_path / "v.json",
    )
    x = np.random.default_rng(3).normal(size=(200, 6)).astype(np.float32)
    np.savez(data, x=x)
    code = main(["verify", a, b, "--data", str(data), "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 1, printed
    out = json.loads(report.read_text())["outputs"]["fc2_out"]
    want = errors(run(model, {"x": x})[0], run(other, {"x": x})[0])
    for key, value in want.items():
        assert out[key] == pytest.approx(value, rel=1e-5), key
    if kind == "scaled":
        assert out["cosine"] == pytest.approx(1.0, abs=1e-7)
        assert out["max_rel_err"] == pytest.approx(0.9, abs=1e-6)
    else:
        assert 0.3 < out["cosine"] < 0.45
    assert breach in printed and "tolerances: rtol 0.001 (default), min-cosine 0.9999 (default)" in printed


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nan_or_inf_where_the_original_is_finite_fails(kind, tmp_path, capsys):
    model, other = classifier_pair(kind)
    report = tmp_path / "v.json"
    code = main(
        [
            "verify",
            save(model, tmp_path / "a.onnx"),
            save(other, tmp_path / "b.onnx"),
            "--runs",
            "3",
            "--rtol",
            "1e-3",
            "--report",
            str(report),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1, printed
    text = report.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: non-finite numbers as strings
    result = json.loads(text)
    out = result["outputs"]["fc2_out"]
    # random draws: 3 runs of [2, 6] (dynamic batch 2); column 0 is broken in every row
    assert out["nonfinite"] == 3 * 2 and result["nonfinite"] == 6
    assert out["max_abs_err"] == "inf" and result["max_abs_err"] == "inf"
    assert "fc2_out: 6 NaN/Inf value(s) where the original is finite" in printed


# ---- 13: held-out verification; realistic random draws ------------------------------------------


def test_reduce_with_data_verifies_on_held_out_rows(tmp_path, capsys):
    model = planted_mlp([6, 24, 16, 3], [5, 4], seed=4)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    source, data, out, report = (
        save(model, tmp_path / "m.onnx"),
        tmp_path / "d.npz",
        tmp_path / "o.onnx",
        tmp_path / "r.json",
    )
    np.savez(data, x=x)
    code = main(
        [
            "reduce",
            source,
            str(out),
            "--threshold",
            "0.9",
            "--data",
            str(data),
            "--verify",
            "--report",
            str(report),
        ]
    )
    printed = capsys.readouterr().out
    verify = json.loads(report.read_text())["verify"]
    assert code == 0
    assert verify["inputs"] == "held-out data" and verify["rows"] == 10 and verify["calibration_rows"] == 40
    assert "verified on 10 held-out rows not used for calibration (40 calibrated)" in printed
    held = x[40:]
    want = errors(run(model, {"x": held})[0], run(onnx.load(out), {"x": held})[0])
    got = verify["outputs"][model.graph.output[0].name]
    for key in ("max_abs_err", "max_rel_err", "cosine"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # calibrated on the first 40 rows only: the same model as calibrating on them directly
    direct = api.condense(model, threshold=0.9, calibration={"x": x[:40]}).model
    reduced = onnx.load(out)
    for tensor in direct.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), array(reduced, tensor.name))


def test_reduce_with_data_and_verify_needs_two_rows(tmp_path, capsys):
    source, data = save(planted_mlp([6, 24, 3], [5]), tmp_path / "m.onnx"), tmp_path / "d.npz"
    np.savez(data, x=np.ones((1, 6), np.float32))
    assert main(["reduce", source, str(tmp_path / "o.onnx"), "--data", str(data), "--verify"]) == 2
    assert "the data has 1 row(s), at least 2 are needed" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o.onnx").exists()


def conv_model():
    """x [N, 1, H, W] (H, W dynamic) -> 3x3 Conv (8 channels, 4 distinct) -> Relu -> 3x3 Conv (2)
    -> GlobalAveragePool: needs H, W >= 5, which dynamic dimensions of 1 never give."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 9))
    w1 = (base[[0, 1, 2, 3, 0, 1, 2, 3]] * rng.uniform(0.5, 2, (8, 1))).reshape(8, 1, 3, 3)
    inits = [
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(2, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 1, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def reduce_and_verify(source, out, report) -> int:
    return main(
        ["reduce", source, str(out), "--threshold", "0.9999", "--verify", "--quiet", "--report", str(report)]
    )


def test_random_draws_give_dynamic_dimensions_a_realistic_size(tmp_path):
    model = conv_model()
    source, out, report = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    assert reduce_and_verify(source, out, report) == 0
    verify = json.loads(report.read_text())
    assert [layer["width_after"] for layer in verify["layers"]] == [4]
    verify = verify["verify"]
    assert verify["runs"] == 4 and verify["rows"] == 8  # 4 draws of a batch of 2
    rng, reduced, worst = np.random.default_rng(0), onnx.load(out), 0.0
    for _ in range(4):  # the same draws: [2, 1, 32, 32]
        x = rng.standard_normal([2, 1, 32, 32]).astype(np.float32)
        worst = max(worst, float(np.abs(run(model, {"x": x})[0] - run(reduced, {"x": x})[0]).max()))
    assert verify["max_abs_err"] == pytest.approx(worst, rel=1e-6, abs=1e-12)


def lookup_model(extra_use=False):
    """ids int64 [N, 5] -> Gather from a [7, 4] table -> Flatten -> MLP. Random integers in [0, 10)
    run out of the table; with `extra_use` ids also feed a Cast (not a lookup)."""
    rng = np.random.default_rng(0)
    mlp = planted_mlp([20, 12, 3], [4], seed=2)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
        helper.make_node("Flatten", ["emb"], ["x"], axis=1),
    ] + list(mlp.graph.node)
    inits = [numpy_helper.from_array(rng.normal(size=(7, 4)).astype(np.float32), "table")]
    inits += list(mlp.graph.initializer)
    outputs = list(mlp.graph.output)
    if extra_use:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("ids_f", TensorProto.FLOAT, ["N", 5]))
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])
    graph = helper.make_graph(nodes, "lookup", [ids], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def test_random_integer_inputs_index_inside_the_table(tmp_path):
    model = lookup_model()
    source, out, report = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    assert reduce_and_verify(source, out, report) == 0
    verify = json.loads(report.read_text())["verify"]
    rng, reduced, worst = np.random.default_rng(0), onnx.load(out), 0.0
    for _ in range(4):
        ids = rng.integers(0, 7, [2, 5]).astype(np.int64)
        assert ids.max() < 7
        worst = max(worst, float(np.abs(run(model, {"ids": ids})[0] - run(reduced, {"ids": ids})[0]).max()))
    assert verify["max_abs_err"] == pytest.approx(worst, rel=1e-6, abs=1e-12)


def test_random_draws_refuse_integer_inputs_of_unknown_meaning(tmp_path, capsys):
    source = save(lookup_model(extra_use=True), tmp_path / "m.onnx")
    assert main(["verify", source, source]) == 2
    line = one_line(capsys.readouterr().err)
    assert "integer input 'ids'" in line and "--data" in line


# ---- 14: --min-agreement applies or is an error; --round-to with widths; a width floor ----------


def test_min_agreement_that_applies_to_no_output_is_an_error(tmp_path, capsys):
    source = save(planted_mlp([5, 12, 1], [4]), tmp_path / "m.onnx")  # a regression output [N, 1]
    assert main(["verify", source, source, "--min-agreement", "0.99"]) == 2
    assert "--min-agreement applies to no output" in one_line(capsys.readouterr().err)


def test_min_agreement_makes_any_batch_by_classes_output_class_scores(tmp_path, capsys):
    model, other = classifier_pair("mixed")  # output 'fc2_out' [N, 4]: neither named nor Softmax
    data, report = tmp_path / "d.npz", tmp_path / "v.json"
    x = np.random.default_rng(3).normal(size=(200, 6)).astype(np.float32)
    np.savez(data, x=x)
    code = main(
        [
            "verify",
            save(model, tmp_path / "a.onnx"),
            save(other, tmp_path / "b.onnx"),
            "--data",
            str(data),
            "--min-agreement",
            "0.99",
            "--report",
            str(report),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1, printed
    agreement = float(np.mean(run(model, {"x": x})[0].argmax(1) == run(other, {"x": x})[0].argmax(1)))
    assert agreement < 0.99
    assert json.loads(report.read_text())["outputs"]["fc2_out"]["top1_agreement"] == pytest.approx(agreement)
    assert f"fc2_out: top-1 agreement {agreement:.4f} < 0.99" in printed


@pytest.mark.parametrize(
    "widths,expected",
    [(["--layer-width", "fc1=5", "--layer-width", "fc2=9"], [8, 12]), (["--target-params", "0.5"], None)],
)
def test_round_to_is_honoured_with_requested_widths(widths, expected, tmp_path):
    model = planted_mlp([6, 40, 30, 3], [40, 30], seed=6)  # nothing parallel: widths decide
    source, out, report = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    assert (
        main(["reduce", source, str(out), "--round-to", "4", "--quiet", "--report", str(report)] + widths)
        == 0
    )
    layers = json.loads(report.read_text())["layers"]
    after = [layer["width_after"] for layer in layers]
    written = [array(onnx.load(out), f"fc{i}.weight").shape[0] for i in (1, 2)]
    assert after == written and all(w % 4 == 0 for w in after)
    if expected is not None:
        assert after == expected
    else:  # round(fraction * width), rounded up to a multiple of 4; the target is not exceeded
        target = json.loads(report.read_text())["target_params"]
        before = 40 * 6 + 40 + 30 * 40 + 30 + 3 * 30 + 3
        assert after == [
            -(-round(target["width_fraction"] * layer["width_before"]) // 4) * 4 for layer in layers
        ]
        params = sum(t.size for t in map(numpy_helper.to_array, onnx.load(out).graph.initializer))
        assert params / before == pytest.approx(target["achieved"])
        assert target["achieved"] <= 0.5


def test_target_params_never_cuts_a_layer_below_the_floor(tmp_path, capsys):
    model = planted_mlp([5, 200, 3], [200], seed=8)  # 1,803 params, 1,200 of them in fc1
    source, out, report = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    # 5% of the params needs fc1 at 10 of 200 neurons (5%): below the default floor of 10%
    assert main(["reduce", source, str(out), "--target-params", "0.05"]) == 2
    floor_params = 20 * 6 + 3 * 21  # fc1 at 20 neurons
    line = one_line(capsys.readouterr().err)
    assert f"the smallest reachable is {floor_params / 1803:.3f}" in line and "0.1 of its width" in line
    assert not out.exists()
    assert (
        main(
            [
                "reduce",
                source,
                str(out),
                "--target-params",
                "0.05",
                "--min-width-fraction",
                "0.02",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    layer = json.loads(report.read_text())["layers"][0]
    assert array(onnx.load(out), "fc1.weight").shape[0] == layer["width_after"] < 20
    kept = 100 * layer["width_after"] / 200
    assert f"200 -> {layer['width_after']} ({kept:.0f}%)" in capsys.readouterr().out


# ---- 15: exit codes; --debug after the command; a closed stdout ----------------------------------


def test_an_unexpected_exception_exits_3_in_one_line(tmp_path, monkeypatch, capsys):
    def crash(self, model):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(CondenseChannelsPass, "__call__", crash)
    source = save(planted_mlp([5, 12, 3], [4]), tmp_path / "m.onnx")
    assert main(["reduce", source, str(tmp_path / "o.onnx")]) == 3
    assert one_line(capsys.readouterr().err) == (
        "condense-graph: internal error (a bug in condense-graph, please report it): ZeroDivisionError: "
        "float division by zero; rerun with --debug for the traceback"
    )
    with pytest.raises(ZeroDivisionError):
        main(["reduce", source, str(tmp_path / "o.onnx"), "--debug"])


def test_an_internal_error_from_the_math_says_it_is_a_bug(tmp_path, monkeypatch, capsys):
    from condense_graph.errors import InternalError

    def crash(self, model):
        raise InternalError("non-finite merge factor or offset for channel(s) [3]")

    monkeypatch.setattr(CondenseChannelsPass, "__call__", crash)
    source = save(planted_mlp([5, 12, 3], [4]), tmp_path / "m.onnx")
    assert main(["reduce", source, str(tmp_path / "o.onnx")]) == 3
    assert one_line(capsys.readouterr().err) == (
        "condense-graph: internal error (a bug in condense-graph, please report it): non-finite merge "
        "factor or offset for channel(s) [3]; rerun with --debug for the traceback"
    )
    assert not (tmp_path / "o.onnx").exists()


CRASHING = (
    "import sys; from condense_graph.cli import main\n"
    "from passes.condense_channels import CondenseChannelsPass as P\n"
    "P.__call__ = lambda self, model: 1 / 0\n"
    "sys.exit(main(sys.argv[1:]))"
)


def test_exit_codes_and_debug_after_the_command_in_a_subprocess(tmp_path):
    source = save(planted_mlp([5, 12, 3], [4]), tmp_path / "m.onnx")
    out = str(tmp_path / "o.onnx")

    def cli(*argv, code=CRASHING):
        return subprocess.run([sys.executable, "-c", code] + list(argv), capture_output=True, text=True)

    crash = cli("reduce", source, out)
    assert crash.returncode == 3 and "ZeroDivisionError: division by zero; rerun with --debug" in crash.stderr
    assert len(message_lines(crash.stderr)) == 1 and "Traceback" not in crash.stderr
    debug = cli("reduce", source, out, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr
    usage = cli("reduce", str(tmp_path / "missing.onnx"), out, "--debug")
    assert usage.returncode == 1 and "CondenseError: no such file" in usage.stderr  # traceback, not one line
    plain = "import sys; from condense_graph.cli import main; sys.exit(main(sys.argv[1:]))"
    assert cli("reduce", str(tmp_path / "missing.onnx"), out, code=plain).returncode == 2


def test_a_closed_stdout_ends_quietly(tmp_path):
    source = save(planted_mlp([5, 12, 10, 3], [4, 6]), tmp_path / "m.onnx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "condense_graph.cli", "inspect", source],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before anything is printed (`| head -0`)
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0 and stderr == ""


# ---- 11 (review): non-finite values the input computes are the input's, not ours ---------------


def _with_extra_output(model, nodes, inits, name, shape):
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, shape))
    model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("pattern", ["causal_mask", "value_float_bound"])
def test_non_finite_values_the_input_computes_pass_the_safety_net(pattern, tmp_path):
    """A causal mask ConstantOfShape(-inf) -> Trilu (folded into a new -inf tensor) and a Clip
    bound Constant(value_float=inf) next to a reducible layer: exit 0, not 'a bug'."""
    model = planted_mlp([6, 16, 4], [3])
    if pattern == "causal_mask":
        fill = helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [-np.inf])
        model = _with_extra_output(
            model,
            [
                helper.make_node("ConstantOfShape", ["mask_shape"], ["full"], value=fill),
                helper.make_node("Trilu", ["full", "one"], ["mask"], upper=1),
                helper.make_node("Add", ["s", "mask"], ["masked"]),
            ],
            [
                numpy_helper.from_array(np.array([4, 4], np.int64), "mask_shape"),
                numpy_helper.from_array(np.array(1, np.int64), "one"),
            ],
            "masked",
            [4, 4],
        )
        feeds = {"s": np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)}
    else:
        model = _with_extra_output(
            model,
            [
                helper.make_node("Constant", [], ["hi"], value_float=float("inf")),
                helper.make_node("Constant", [], ["lo"], value_float=0.0),
                helper.make_node("Clip", ["s", "lo", "hi"], ["clipped"]),
            ],
            [],
            "clipped",
            [3],
        )
        feeds = {"s": np.array([-1.0, 0.5, 7.0], np.float32)}
    source, out = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    assert main(["reduce", source, str(out), "--threshold", "1.0", "--quiet"]) == 0
    reduced = onnx.load(out)
    assert len(reduced.graph.node) <= len(model.graph.node)
    feeds["x"] = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    for expected, actual in zip(run(model, feeds), run(reduced, feeds), strict=True):
        np.testing.assert_allclose(
            actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected[np.isfinite(expected)]).max()
        )


def test_a_non_finite_weight_the_pass_wrote_is_refused_even_if_the_input_had_one():
    from condense_graph.errors import InternalError
    from condense_graph.safety import check_output

    model = planted_mlp([5, 12, 3], [4])
    made = onnx.ModelProto()
    made.CopyFrom(model)
    replace_initializer(made, "fc1.bias", np.full(12, np.nan, np.float32))
    with pytest.raises(InternalError, match="'fc1.bias'"):
        check_output(made, made, written={"fc1.bias"})  # the same NaN as the input: still ours


def test_a_scalar_graph_input_verifies_with_random_draws_and_data(tmp_path):
    """A 0-d input (a softmax temperature) is not batched: it is fed whole to every batch."""
    model = planted_mlp([6, 16, 4], [3])
    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Div", ["raw", "temperature"], [out]))
    model.graph.input.insert(0, helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []))
    source, data = save(model, tmp_path / "m.onnx"), tmp_path / "d.npz"
    assert main(["reduce", source, str(tmp_path / "o.onnx"), "--threshold", "1.0", "--verify"]) == 0
    x = np.random.default_rng(2).normal(size=(20, 6)).astype(np.float32)
    np.savez(data, x=x, temperature=np.float32(2.0))
    report = tmp_path / "v.json"
    assert (
        main(
            [
                "verify",
                source,
                str(tmp_path / "o.onnx"),
                "--data",
                str(data),
                "--batch-size",
                "8",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["rows"] == 20
    feeds = {"x": x, "temperature": np.array(2.0, np.float32)}
    expected = run(model, feeds)[0]
    actual = run(onnx.load(tmp_path / "o.onnx"), feeds)[0]
    assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()
    assert (
        main(
            [
                "reduce",
                source,
                str(tmp_path / "o2.onnx"),
                "--threshold",
                "1.0",
                "--data",
                str(data),
                "--verify",
            ]
        )
        == 0
    )
