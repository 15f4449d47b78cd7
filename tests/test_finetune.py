"""`finetune` and `condense-graph finetune` (issue 14, part 3): reduce and retrain an ONNX model
without its training code, on the example chemistry MLP (real Cantera data in examples/) and on a
small digits CNN. Every metric the report states is recomputed here in ONNX Runtime, on the split
the docstring promises (a seeded permutation, the last `holdout` fraction held out)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import check_full, message_lines
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from condense_graph import runtime  # noqa: E402
from condense_graph.auto_reduce import Cosine, LoopConfig  # noqa: E402
from condense_graph.cli import main  # noqa: E402
from condense_graph.errors import CondenseError  # noqa: E402
from condense_graph.finetune import criteria_for, finetune  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples"
MLP = EXAMPLE / "drm19_mlp.onnx"
ROWS = 800  # of the 2000 shipped: enough for a held-out split of 160, small enough for seconds
# few steps per phase: the tests check the mechanism (reduce, retrain, roll back, measure), not
# how far a long run gets (benchmarks/loop_table1.py does)
FAST = LoopConfig(
    lr=Cosine(1e-4, 1e-6, 200, hold=False),
    layer_steps=20,
    last_layer_steps=20,
    main_steps=30,
    eval_every=5,
    final_steps=20,
    patience=4,
    max_main=1,
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chemistry():
    with np.load(EXAMPLE / "drm19_states.npz") as data:
        return {"state": data["state"][:ROWS], "rate": data["rate"][:ROWS]}


def held_out(n: int, holdout: float = 0.2, seed: int = 0) -> np.ndarray:
    """The validation rows `finetune` promises: the last `holdout` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    return order[n - int(round(n * holdout)) :]


def ort_mse(model, x, y) -> float:
    out = runtime.session(model).run(None, {"state": x})[0]
    return float(np.mean((out.astype(np.float64) - y) ** 2))


def widths_in(model: onnx.ModelProto) -> list[int]:
    """Output widths of the Gemm/MatMul weights, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    widths = []
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul") and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            widths.append(dims[0] if trans else dims[-1])
    return widths


@pytest.fixture(scope="module")
def mlp_run(chemistry):
    before = digest(MLP)
    result = finetune(MLP, chemistry, "rate", "mse", tolerance=0.1, config=FAST, quiet=True)
    assert digest(MLP) == before  # the input is never modified
    return result


def test_finetune_makes_the_mlp_smaller_within_the_tolerance(mlp_run, chemistry):
    report, model = mlp_run.report, mlp_run.model
    check_full(model)
    assert report["params_after"] < 0.7 * report["params_before"]
    assert report["reductions_kept"] >= 1 and report["steps"] > 0
    # the numbers the report gives, measured again on the promised split in ONNX Runtime
    val = held_out(ROWS)
    x, y = chemistry["state"][val], chemistry["rate"][val]
    assert report["validation_rows"] == len(val) == 160
    before, after = ort_mse(onnx.load(MLP), x, y), ort_mse(model, x, y)
    assert report["metric_before"] == pytest.approx(before, rel=1e-4)
    assert report["metric_after"] == pytest.approx(after, rel=1e-4)
    assert report["criterion"] == pytest.approx(1.1 * report["metric_before"], rel=1e-9)
    assert after <= report["criterion"] and report["criterion_met"] is True
    # the widths reported are the model's
    assert [b for _, b in report["widths"].values()] == widths_in(model)[:-1]
    assert widths_in(model)[-1] == 23  # the output layer is never reduced


def test_finetune_rolls_back_and_logs_every_event(mlp_run):
    log = mlp_run.loop.log
    events = {e["event"] for e in log}
    assert {"reduce", "accept", "evaluate", "done"} <= events
    rollbacks = [e for e in log if e["event"] == "rollback"]
    assert len(rollbacks) == mlp_run.report["rollbacks"]
    accepted = [e for e in log if e["event"] == "accept"]
    assert len(accepted) == mlp_run.report["reductions_kept"]
    # each kept reduction met its layer level (no looser than the tolerance)
    assert all(e["metric"] <= e["level"] <= mlp_run.report["criterion"] * (1 + 1e-9) for e in accepted)


def test_finetune_with_no_tolerance_never_returns_a_worse_model(chemistry):
    result = finetune(MLP, chemistry, "rate", "mse", tolerance=0.0, config=FAST, quiet=True)
    report = result.report
    val = held_out(ROWS)
    after = ort_mse(result.model, chemistry["state"][val], chemistry["rate"][val])
    assert report["criterion_met"] is True
    assert after <= report["metric_before"] * (1 + 1e-6)
    assert report["params_after"] <= report["params_before"]
    if report["fallback"]:
        assert any(e["event"] == "fallback" for e in result.loop.log)


def test_finetune_with_an_error_budget(chemistry):
    result = finetune(MLP, chemistry, "rate", "mse", tolerance=0.1, max_error=0.05, config=FAST, quiet=True)
    report = result.report
    assert report["target"] == "max_error"
    assert report["params_after"] < report["params_before"]
    assert report["criterion_met"] is True
    check_full(result.model)


def test_criteria_layer_levels_are_no_looser_than_the_tolerance():
    criteria = criteria_for("mse", 2.0, 0.1)
    assert criteria.final == pytest.approx(2.2)
    assert criteria.last_layer == pytest.approx(2.2)
    assert criteria.met(2.2, criteria.final) and not criteria.met(2.2001, criteria.final)
    accuracy = criteria_for("cross-entropy", 0.9, 0.02)
    assert accuracy.final == pytest.approx(0.88) and accuracy.met(0.9, accuracy.final)
    assert not accuracy.met(float("nan"), accuracy.final)


# ---- cross-entropy on a digits CNN


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small CNN trained briefly on scikit-learn's digits, exported; its data as .npz."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 24, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(24, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 48),
        nn.ReLU(),
        nn.Linear(48, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(150):
        rows = torch.randint(0, len(y), (128,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(net(xt[rows]), yt[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("digits")
    path = folder / "cnn.onnx"
    torch.onnx.export(
        net.eval(),
        (xt[:1],),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}},
        dynamo=False,
        opset_version=17,
    )
    np.savez(folder / "digits.npz", image=x, label=y)
    return path, folder / "digits.npz", x, y


def test_finetune_cross_entropy_keeps_accuracy_on_digits(digits):
    path, _, x, y = digits
    result = finetune(
        path,
        {"image": x, "label": y},
        "label",
        "cross-entropy",
        tolerance=0.02,
        width_fraction=0.75,
        config=FAST,
        quiet=True,
    )
    report = result.report
    check_full(result.model)
    val = held_out(len(y))
    logits = runtime.session(result.model).run(None, {"image": x[val]})[0]
    accuracy = float(np.mean(logits.argmax(-1) == y[val]))
    original = runtime.session(onnx.load(path)).run(None, {"image": x[val]})[0]
    assert report["metric_before"] == pytest.approx(float(np.mean(original.argmax(-1) == y[val])))
    assert report["metric_after"] == pytest.approx(accuracy)
    assert report["metric_before"] > 0.8  # a trained network: the levels mean something
    assert accuracy >= report["metric_before"] - 0.02 and report["criterion_met"] is True
    # a briefly trained net has few condensed neurons: a width target (3/4 of each layer)
    assert report["target"] == "width"
    assert report["params_after"] < report["params_before"]
    assert all(after < before for before, after in report["widths"].values())


# ---- the command line


def test_cli_finetune_writes_the_model_and_report(tmp_path, capsys):
    with np.load(EXAMPLE / "drm19_states.npz") as data:
        np.savez(tmp_path / "d.npz", state=data["state"][:ROWS], rate=data["rate"][:ROWS])
    out, report_path, log = tmp_path / "small.onnx", tmp_path / "r.json", tmp_path / "log.json"
    before = digest(MLP)
    argv = ["finetune", str(MLP), str(out), "--data", str(tmp_path / "d.npz"), "--targets", "rate"]
    argv += ["--loss", "mse", "--tolerance", "0.1", "--max-main", "1", "--max-steps", "150"]
    argv += ["--report", str(report_path), "--log", str(log), "--quiet"]
    code = main(argv)
    report = json.loads(report_path.read_text())
    assert digest(MLP) == before
    assert code == (0 if report["criterion_met"] else 1)
    assert code == 0 and out.exists()
    model = onnx.load(out)
    check_full(model)
    assert report["steps"] <= 150
    assert report["params_after"] == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert json.loads(log.read_text())  # the loop's events, as JSON
    assert capsys.readouterr().out == ""  # --quiet


def cli_error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(message_lines(err)) == 1 and "Traceback" not in err
    return err


def test_cli_finetune_names_a_missing_array(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", inputs=np.zeros((10, 23), np.float32), rate=np.zeros((10, 23), np.float32))
    err = cli_error(
        [
            "finetune",
            MLP,
            tmp_path / "o.onnx",
            "--data",
            tmp_path / "d.npz",
            "--targets",
            "rate",
            "--loss",
            "mse",
        ],
        capsys,
    )
    assert "state" in err and "inputs" in err
    assert not (tmp_path / "o.onnx").exists()


def model_with_if() -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm -> If(flag: y, -y): a graph the torch rebuild cannot run."""
    rng = np.random.default_rng(0)

    def branch(name, op):
        node = helper.make_node(op, ["y0"], [f"{name}_out"])
        return helper.make_graph(
            [node], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n", 3])]
        )

    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y0"], name="fc2", transB=1),
        helper.make_node(
            "If",
            ["flag"],
            ["y"],
            name="sign",
            then_branch=branch("pos", "Identity"),
            else_branch=branch("neg", "Neg"),
        ),
    ]
    weights = {
        "w1": rng.standard_normal((8, 4)),
        "b1": np.zeros(8),
        "w2": rng.standard_normal((3, 8)),
        "b2": np.zeros(3),
    }
    graph = helper.make_graph(
        nodes,
        "with_if",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_cli_finetune_refuses_a_graph_it_cannot_rebuild_naming_the_op(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    onnx.save(model_with_if(), path)
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), y=np.zeros((10, 3), np.float32))
    err = cli_error(
        [
            "finetune",
            path,
            tmp_path / "o.onnx",
            "--data",
            tmp_path / "d.npz",
            "--targets",
            "y",
            "--loss",
            "mse",
        ],
        capsys,
    )
    assert "If" in err and "sign" in err
    assert not (tmp_path / "o.onnx").exists()


def test_finetune_rejects_bad_arguments(chemistry):
    with pytest.raises(CondenseError, match="loss"):
        finetune(MLP, chemistry, "rate", "mae")
    with pytest.raises(CondenseError, match="holdout"):
        finetune(MLP, chemistry, "rate", "mse", holdout=1.0)
    with pytest.raises(CondenseError, match="tolerance"):
        finetune(MLP, chemistry, "rate", "mse", tolerance=-0.1)
    with pytest.raises(CondenseError, match="class indices"):
        finetune(MLP, chemistry, "rate", "cross-entropy")
