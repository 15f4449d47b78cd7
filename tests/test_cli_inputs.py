"""Issue 15, the rest of it: what `reduce` says when nothing changed or a bench is skipped, errors
that name flags, a closed stdout, the external-data layout and permissions, --providers, the API's
`save` and `file_size_after`, the README's API block, and the public API's docstrings."""

import inspect as pyinspect
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import planted_mlp

import condense_graph as cg
from condense_graph import runtime
from condense_graph.api import FLAGS
from condense_graph.cli import cli_message, main
from condense_graph.model_io import uses_external_data

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(planted_mlp([5, 12, 10, 3], [4, 6], seed=3), path)
    return path


@pytest.fixture
def wide_path(tmp_path):
    """Weights over 1 KiB: an external-data save puts them in the data file."""
    path = tmp_path / "wide.onnx"
    onnx.save(planted_mlp([64, 32, 16, 3], [8, 8], seed=3), path)
    return path


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32))
    return path


# 1. nothing reduced
def test_nothing_reduced_is_said_and_the_unchanged_model_is_still_written(tmp_path, capsys):
    path, out = tmp_path / "distinct.onnx", tmp_path / "o.onnx"
    onnx.save(planted_mlp([5, 8, 3], [8], seed=1), path)
    assert main(["reduce", str(path), str(out), "--threshold", "0.999"]) == 0
    text = capsys.readouterr().out
    assert f"Wrote {out}" in text and out.exists()  # written: a pipeline's next step finds its file
    hint = next(line for line in text.splitlines() if line.startswith("Nothing was reduced"))
    assert "at threshold 0.999" in hint
    assert "condense-graph inspect" in hint and "--target-params" in hint and "--data" in hint


# 2. bench after a failed verify
def test_bench_after_a_failed_verify_is_one_skipped_line(model_path, tmp_path, capsys):
    args = ["reduce", str(model_path), str(tmp_path / "o.onnx"), "--threshold", "0.5", "--verify", "--bench"]
    assert main([*args, "--runs", "2"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "Bench" in line or "Speedup" in line]
    assert len(lines) == 1 and lines[0].startswith("Bench: skipped (verification failed")
    assert not (tmp_path / "o.onnx").exists()


# 3. errors name the flags
API_NAMES = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")\b")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-params", "0.01"], "--target-params 0.01 cannot be reached"),
        (["--target-params", "1.5"], "--target-params is a fraction of the parameters"),
        (["--round-to", "0"], "--round-to must be a positive integer"),
        (["--max-error", "0.1"], "--max-error needs calibration data (--data)"),
        (["--target-macs", "0.5"], "--target-macs needs calibration data (--data)"),
        (["--max-error", "-1", "--data", "{data}"], "--max-error must be a positive relative error"),
        (["--target-macs", "2", "--data", "{data}"], "--target-macs is a fraction of the MACs"),
        (["--target-params", "0.5", "--max-error", "0.1"], "give one of --target-params, --target-macs"),
        (["--holdout", "1.5"], "--holdout is a fraction of the data rows"),
        (["--min-width-fraction", "2"], "--min-width-fraction is a fraction in [0, 1]"),
        (["--method", "magnitude"], "needs layer widths (--layer-width) or --target-params"),
        (["--threshold", "2"], "--threshold must be a cosine between -1 and 1"),
        (["--layer", "fc1=2"], "threshold of layer 'fc1' (--layer) must be"),
        (["--max-error", "0.1", "--data", "{data}", "--method", "condense"], "--max-error needs method"),
    ],
)
def test_errors_name_the_cli_flags(extra, message, model_path, data_path, tmp_path, capsys):
    extra = [a.replace("{data}", str(data_path)) for a in extra]
    assert main(["reduce", str(model_path), str(tmp_path / "o.onnx"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not API_NAMES.search(err), err  # no target_params, round_to... on the command line


def test_the_api_names_its_parameters_and_the_cli_maps_them(model_path):
    with pytest.raises(cg.CondenseError, match="round_to must be a positive integer"):
        cg.condense(str(model_path), round_to=0)
    assert cli_message("target_params 0.2 cannot be reached (--min-width-fraction)") == (
        "--target-params 0.2 cannot be reached (--min-width-fraction)"
    )
    assert cli_message("no reduction keeps the error within max_error 0.1 (--max-error)") == (
        "no reduction keeps the error within --max-error 0.1"
    )
    assert cli_message("max_rel_err 0.3 > rtol") == "max_rel_err 0.3 > rtol"  # not a parameter


# 4. a closed stdout
@pytest.mark.parametrize("command", ["reduce", "inspect"])
def test_a_closed_stdout_ends_quietly(command, model_path, tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write is EPIPE
    args = [str(model_path)] + (
        [str(tmp_path / "o.onnx"), "--threshold", "0.9"] if command == "reduce" else []
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "condense_graph", command, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            check=False,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_piped_into_head_exits_quietly(model_path, tmp_path):
    script = f"set -o pipefail; {sys.executable} -m condense_graph inspect {model_path} | head -n 1"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, check=False)
    assert done.returncode == 0 and done.stdout.startswith("+")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


# 5. external data: permissions and layout
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_external_data_file_gets_the_model_files_permissions(wide_path, tmp_path):
    out = tmp_path / "o.onnx"
    old = os.umask(0o022)
    try:
        assert main(["reduce", str(wide_path), str(out), "--external-data", "--quiet"]) == 0
    finally:
        os.umask(old)
    data = tmp_path / "o.onnx.data"
    assert data.exists() and _mode(data) == _mode(out) == 0o644  # onnx alone writes the data 0o600


def test_an_input_with_external_data_keeps_that_layout(wide_path, model_path, tmp_path, capsys):
    source = tmp_path / "ext.onnx"
    model = onnx.load(wide_path)
    onnx.save(model, source, save_as_external_data=True, location="ext.weights", size_threshold=0)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["reduce", str(source), str(out), "--threshold", "0.9", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert f"Weights: in {out}.data (as in the input" in text
    assert uses_external_data(onnx.load(out, load_external_data=False))
    got = json.loads(report.read_text())
    assert got["file_size_after"] == out.stat().st_size + Path(f"{out}.data").stat().st_size
    onnx.checker.check_model(str(out))
    runtime.ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # loads from the files
    # a one-file input stays one file, and says nothing about weights
    assert main(["reduce", str(model_path), str(tmp_path / "p.onnx"), "--threshold", "0.9"]) == 0
    assert "Weights:" not in capsys.readouterr().out and not (tmp_path / "p.onnx.data").exists()


def test_api_save_keeps_the_layout_unless_told(wide_path, tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save(onnx.load(wide_path), source, save_as_external_data=True, location="w.bin", size_threshold=0)
    result = cg.condense(str(source), threshold=0.9)
    assert result.external_data
    size = result.save(tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx.data").exists()
    assert (
        size
        == result.report["file_size_after"]
        == sum((tmp_path / n).stat().st_size for n in ("a.onnx", "a.onnx.data"))
    )
    result.save(tmp_path / "b.onnx", external_data=False)
    assert not (tmp_path / "b.onnx.data").exists()
    assert result.report["file_size_after"] == (tmp_path / "b.onnx").stat().st_size


# 6. --providers
def test_providers_cpu_is_used_for_verify_and_bench(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    bench = ["--runs", "2", "--warmup", "0"]
    args = ["reduce", str(model_path), str(out), "--threshold", "0.9", "--verify", "--bench", *bench]
    assert main([*args, "--providers", "cpu", "--quiet"]) == 0
    assert main(["verify", str(model_path), str(out), "--providers", "CPUExecutionProvider", "--quiet"]) == 0
    assert main(["bench", str(model_path), str(out), *bench, "--providers", "cpu,CPU", "--quiet"]) == 0
    assert runtime.PROVIDERS == ["CPUExecutionProvider"]  # restored after each run


@pytest.mark.skipif(
    "CUDAExecutionProvider" in runtime.ort.get_available_providers(), reason="CUDA is available here"
)
@pytest.mark.parametrize("command", ["reduce", "verify", "bench"])
def test_providers_not_available_is_refused_in_one_line(command, model_path, tmp_path, capsys):
    paths = [str(model_path), str(tmp_path / "o.onnx") if command == "reduce" else str(model_path)]
    assert main([command, *paths, "--providers", "cuda,cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "execution provider(s) not available in this onnxruntime: cuda; available: " in err
    assert "CPUExecutionProvider" in err and "onnxruntime-gpu" in err
    assert not (tmp_path / "o.onnx").exists()  # refused before any work


def test_provider_names_take_both_spellings(monkeypatch, model_path):
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: available)
    assert runtime.parse_providers("cuda,cpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.parse_providers("CUDAExecutionProvider, cpu") == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert runtime.parse_providers(["TensorRT", "cuda"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
    ]
    with pytest.raises(
        cg.CondenseError, match="not available in this onnxruntime: rocm; available: Tensorrt"
    ):
        runtime.parse_providers("rocm,cpu")
    monkeypatch.undo()
    with runtime.using_providers("cpu"):
        sess = runtime.session(onnx.load(model_path))
        assert sess.get_providers() == ["CPUExecutionProvider"]


# 7. save, file_size_after, the README's API block
def test_file_size_after_is_the_written_size_in_the_api_and_the_cli(model_path, tmp_path, capsys):
    result = cg.condense(str(model_path), threshold=0.9)
    assert result.report["file_size_after"] == result.model.ByteSize()  # a one-file save's size
    size = result.save(tmp_path / "api.onnx")
    assert size == result.report["file_size_after"] == (tmp_path / "api.onnx").stat().st_size
    out, report = tmp_path / "cli.onnx", tmp_path / "r.json"
    assert main(["reduce", str(model_path), str(out), "--threshold", "0.9", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["file_size_after"] == out.stat().st_size == size
    with pytest.raises(cg.CondenseError, match="output directory does not exist"):
        result.save(tmp_path / "missing" / "x.onnx")


def test_the_readme_api_example_runs_verbatim_on_the_example_model(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert "examples/drm19_mlp.onnx" in block
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)  # what the block writes lands here, not in the checkout
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    onnx.checker.check_model(str(tmp_path / "drm19_mlp.small.onnx"))
    assert scope["result"].report["file_size_after"] == (tmp_path / "drm19_mlp.small.onnx").stat().st_size
    assert scope["small"].report["verify"]


# 8. docstrings
def test_every_public_function_documents_its_arguments_types_and_defaults():
    for name in cg.__all__:
        assert getattr(cg, name).__doc__, f"{name} has no docstring"
    for function in (cg.condense, cg.inspect, cg.CondenseResult.save):
        doc = function.__doc__
        assert "Args:" in doc and ("Returns:" in doc or "return" in doc)
        for parameter in pyinspect.signature(function).parameters.values():
            if parameter.name == "self":
                continue
            entry = re.search(rf"\n\s+{parameter.name} \(([^)]*)\)", doc)
            assert entry, f"{function.__qualname__}: {parameter.name} undocumented"
            if parameter.default is not pyinspect.Parameter.empty:
                assert "default" in entry.group(1), f"{function.__qualname__}: {parameter.name}'s default"
