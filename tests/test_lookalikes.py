"""Never a silently broken model: torch-built look-alikes of real architectures through the CLI.

Every look-alike (`lookalike_models.py`) is exported once and reduced by
`condense-graph reduce --verify` at thresholds 0.999, 0.99, 0.95 and 0.9. Every run must end with
exit 0 and a valid model whose outputs we recompute ourselves in ONNX Runtime, or with exit 1/2
and a reason; never a traceback, NaN, an invalid file, or a PASS at a large error. At threshold 1.0
(without --verify, so the written model has to be right by itself) only the planted exact copies
merge, and the outputs equal the original's to float rounding.
"""

import json
import os
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
from lookalike_models import BUILDERS, export_lookalike  # noqa: E402

from condense_graph.cli import main  # noqa: E402

THRESHOLDS = (0.999, 0.99, 0.95, 0.9)
PASS_MAX_REL_ERR = 1e-3  # a PASS verdict must mean max|diff| / max|orig| at most this...
PASS_MIN_COSINE = 0.999  # ...and an output cosine at least this, on our own inputs
EXACT_REL_ERR = 1e-5  # exact copies merged: float rounding, relative to the output scale
DRAWS = 3  # random draws of our own recomputation
CASES = [(name, exporter) for name, build in BUILDERS.items() for exporter in build().exporters]
CASE_IDS = [f"{name}-{exporter}" for name, exporter in CASES]


# ---- fixtures: each look-alike exported once ---------------------------------------------------


class Exported:
    def __init__(self, lookalike, exporter, path: Path):
        self.lookalike, self.exporter, self.path = lookalike, exporter, path
        self.model = onnx.load(str(path))
        shape = list(lookalike.example.shape)
        # --input-shape for the CLI's verify; our own check also tries another H and W
        self.cli_shape = shape if lookalike.dynamic_hw else None
        self.shapes = [shape] + ([[shape[0], shape[1], 24, 40]] if lookalike.dynamic_hw else [])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lookalikes")
    cache = {}

    def get(name: str, exporter: str) -> Exported:
        if (name, exporter) not in cache:
            lookalike = BUILDERS[name]()
            path = folder / f"{name}_{exporter}.onnx"
            export_lookalike(lookalike, exporter, path)
            cache[name, exporter] = Exported(lookalike, exporter, path)
        return cache[name, exporter]

    return get


# ---- running the CLI ---------------------------------------------------------------------------


def run_cli(
    case: Exported, out: Path, report: Path, threshold: float, capsys, verify: bool = True, extra: tuple = ()
) -> tuple[int, str, str]:
    argv = ["reduce", str(case.path), str(out), "--threshold", str(threshold), "--report", str(report)]
    argv += (["--verify"] if verify else []) + list(extra)
    if case.cli_shape and verify:
        argv += ["--input-shape", "x:" + ",".join(map(str, case.cli_shape))]
    before = case.path.read_bytes()
    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001 - a traceback escaping main is the failure we look for
        captured = capsys.readouterr()
        pytest.fail(
            f"exception escaped main({argv}):\n{traceback.format_exc()}\n{captured.out}\n{captured.err}"
        )
    captured = capsys.readouterr()
    assert case.path.read_bytes() == before, "the input file was modified"
    assert code in (0, 1, 2), f"exit code {code}\n{captured.out}\n{captured.err}"
    return code, captured.out, captured.err


# ---- our own checks of a written model ---------------------------------------------------------


def all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def float_constants(model: onnx.ModelProto):
    """(name, values) of every float initializer and Constant of the model and its subgraphs."""
    for graph in all_graphs(model.graph):
        tensors = list(graph.initializer) + [
            a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        for tensor in tensors:
            values = numpy_helper.to_array(tensor)
            if np.issubdtype(values.dtype, np.floating):
                yield tensor.name, values


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_both(original, candidate, feeds) -> tuple[list, list]:
    want = original.run(None, feeds)
    try:
        return want, candidate.run(None, feeds)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception classes
        pytest.fail(f"the written model does not run in ONNX Runtime: {str(err).strip().splitlines()[-1]}")


def measured_errors(case: Exported, reduced: Path) -> list[tuple[float, float]]:
    """(scale-relative error, cosine) per output and draw, both models run by us in ORT."""
    original = ort_session(case.path)
    try:
        candidate = ort_session(reduced)
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"the written model does not load in ONNX Runtime: {str(err).strip().splitlines()[-1]}")
    rng = np.random.default_rng(2024)
    errors = []
    for shape in case.shapes:
        for _ in range(DRAWS):
            feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
            for name, want, got in zip(
                case.lookalike.outputs, *run_both(original, candidate, feeds), strict=True
            ):
                assert np.all(np.isfinite(want)), f"original output {name} is not finite"
                assert got.shape == want.shape, f"output {name}: shape {got.shape} != {want.shape}"
                assert np.all(np.isfinite(got)), f"reduced output {name} has NaN/Inf at input shape {shape}"
                diff = float(np.abs(got - want).max()) / float(np.abs(want).max())
                cosine = float(
                    np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want))
                )
                errors.append((diff, cosine))
    return errors


def size_on_disk(path: Path) -> int:
    """Bytes of the model file and of the external data files it names (the dynamo exporter
    writes its weights to NAME.onnx.data)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for graph in all_graphs(model.graph)
        for tensor in graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return os.path.getsize(path) + sum(os.path.getsize(path.parent / name) for name in locations)


def check_written_model(case: Exported, out: Path) -> list[tuple[float, float]]:
    assert out.exists(), "exit 0 but no output written"
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    for name, values in float_constants(model):
        assert np.all(np.isfinite(values)), f"initializer {name} has NaN/Inf"
    before, after = size_on_disk(case.path), size_on_disk(out)
    assert after <= before, f"the reduced model takes {after} bytes, the original {before}"
    return measured_errors(case, out)


def count_params(path: Path) -> int:
    """Elements of every initializer and Constant tensor, in the main graph and in subgraphs."""
    model = onnx.load(str(path))
    return sum(
        int(np.prod(tensor.dims))
        for graph in all_graphs(model.graph)
        for tensor in list(graph.initializer)
        + [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    )


def check_report(report_path: Path, case: Exported, out: Path) -> dict:
    """params_after <= params_before, and both are the models' real counts (written model only)."""
    report = json.loads(report_path.read_text())
    before, after = report["params_before"], report["params_after"]
    assert after <= before, f"params grew: {before} -> {after}"
    if out.exists():
        counted = (count_params(case.path), count_params(out))
        assert (before, after) == counted, (
            f"report says params {before} -> {after}, the models hold {counted}"
        )
    return report


# ---- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("name,exporter", CASES, ids=CASE_IDS)
def test_reduce_with_verify_ends_in_a_verified_model_or_a_reason(
    name, exporter, threshold, exported, tmp_path, capsys
):
    case = exported(name, exporter)
    out, report_path = tmp_path / "reduced.onnx", tmp_path / "report.json"
    code, stdout, stderr = run_cli(case, out, report_path, threshold, capsys)
    context = f"exit {code}\n{stdout}\n{stderr}"
    # every look-alike is a valid model with its dynamic shapes given: a user error is a failure
    assert code != 2, context
    check_report(report_path, case, out)
    if code == 1:
        assert not out.exists(), context
        assert "Verify: FAIL (" in stdout and "output not written" in stdout, context
        check_failed_verdict(case, tmp_path, threshold, capsys, report_path)
        return
    assert "Verify: PASS" in stdout, context
    errors = check_written_model(case, out)
    worst_err, worst_cos = max(e for e, _ in errors), min(c for _, c in errors)
    assert worst_err <= PASS_MAX_REL_ERR and worst_cos >= PASS_MIN_COSINE, (
        f"PASS at measured max_rel_err {worst_err:.3g}, cosine {worst_cos:.6f}\n{context}"
    )


def check_failed_verdict(case: Exported, tmp_path: Path, threshold: float, capsys, report_path: Path) -> None:
    """A FAIL must be about a valid model whose error is what verify says: written with --force,
    it passes our checks, and `verify --data` on our own draws reports the max_rel_err we measure
    on the same draws."""
    forced = tmp_path / "forced.onnx"
    code, stdout, stderr = run_cli(
        case, forced, tmp_path / "forced.json", threshold, capsys, extra=("--force",)
    )
    assert code == 1 and forced.exists(), f"exit {code}\n{stdout}\n{stderr}"
    check_written_model(case, forced)
    x = np.random.default_rng(7).standard_normal([4] + case.shapes[0][1:]).astype(np.float32)
    if case.model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        x = x[: case.shapes[0][0]]  # a fixed batch
    np.savez(tmp_path / "draws.npz", x=x)
    verify_json = tmp_path / "verify.json"
    # other inputs than reduce's own draws: the verdict may differ, the numbers must be ours
    assert main(
        [
            "verify",
            str(case.path),
            str(forced),
            "--data",
            str(tmp_path / "draws.npz"),
            "--report",
            str(verify_json),
            "--quiet",
        ]
    ) in (0, 1)
    capsys.readouterr()
    original, reduced = ort_session(case.path), ort_session(forced)
    outputs = json.loads(verify_json.read_text())["outputs"]
    for name, want, got in zip(case.lookalike.outputs, *run_both(original, reduced, {"x": x}), strict=True):
        measured = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
        assert np.isclose(outputs[name]["max_rel_err"], measured, rtol=1e-5, atol=0), (name, outputs[name])


def weight_shape(model: onnx.ModelProto, node_name: str) -> tuple | None:
    """The shape of the weight (input 1) of node `node_name`, an initializer or Constant, in
    torch layout (a MatMul's [in, out] or a transB=0 Gemm's weight is read transposed)."""
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None or len(node.input) < 2:
        return None
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes |= {
        n.output[0]: tuple(a.t.dims)
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    shape = shapes.get(node.input[1])
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if shape is not None and (node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)):
        shape = shape[::-1]
    return shape


@pytest.mark.parametrize("name,exporter", CASES, ids=CASE_IDS)
def test_threshold_one_merges_the_planted_copies_exactly(name, exporter, exported, tmp_path, capsys):
    case = exported(name, exporter)
    out, report_path = tmp_path / "reduced.onnx", tmp_path / "report.json"
    # without --verify: the model written must be right on its own (the CLI's check is not the net)
    code, stdout, stderr = run_cli(case, out, report_path, 1.0, capsys, verify=False)
    context = f"exit {code}\n{stdout}\n{stderr}"
    assert code == 0, context
    report = check_report(report_path, case, out)
    planted = {p.weight_shape: p for p in case.lookalike.planted}
    removed = {}
    skipped = {weight_shape(case.model, s["name"]): s["reason"] for s in report["skipped"]}
    for layer in report["layers"]:  # a coupled group's entry gives each member's width after
        group = layer.get("group", {"members": [layer["name"]], "member_widths": [layer["width_after"]]})
        for member, after in zip(group["members"], group["member_widths"], strict=True):
            shape = weight_shape(case.model, member)
            before = layer["width_before"] if "group" not in layer else shape[0]
            removed[shape] = removed.get(shape, 0) + before - after
            if "group" in layer:
                skipped.setdefault(shape, f"member of the {layer['group']['kind']} group '{layer['name']}'")
    for shape, plant in planted.items():
        if plant.expect == "merge":
            assert removed.get(shape) == plant.copies, (
                f"layer {shape}: {removed.get(shape)} channels merged, {plant.copies} planted "
                f"(skipped: {skipped.get(shape)})\n{context}"
            )
        else:
            assert not removed.get(shape) and skipped.get(shape), (
                f"layer {shape} should be skipped with a reason\n{context}"
            )
    spurious = {s: n for s, n in removed.items() if n and s not in planted}
    assert not spurious, f"unplanted layers reduced at threshold 1.0: {spurious}\n{context}"
    errors = check_written_model(case, out)
    worst = max(e for e, _ in errors)
    assert worst <= EXACT_REL_ERR, f"exact copies merged with max_rel_err {worst:.3g}\n{context}"
