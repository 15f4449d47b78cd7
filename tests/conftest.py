import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# the torch architectures (`torch_models`) live with the benchmarks, which import them as scripts
sys.path.insert(1, str(Path(__file__).parents[1] / "benchmarks"))

from builders import run  # noqa: E402,F401


def assert_same_outputs(
    original: onnx.ModelProto, reduced: onnx.ModelProto, feeds: dict, rtol: float = 1e-5
) -> None:
    """Outputs agree within `rtol` relative to each output's largest magnitude."""
    for expected, actual in zip(run(original, feeds), run(reduced, feeds), strict=True):
        assert actual.shape == expected.shape
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def check_full(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rounding_scale(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """|W| |x| through the network: the magnitude of the sums behind each output, which bounds
    float rounding (an output near zero can still be the difference of large terms)."""
    from onnx import numpy_helper

    magnitude = onnx.ModelProto()
    magnitude.CopyFrom(model)
    for i, tensor in enumerate(magnitude.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if np.issubdtype(values.dtype, np.floating):
            magnitude.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.abs(values), tensor.name))
    return run(magnitude, {k: np.abs(v) for k, v in feeds.items()})


def assert_equal_to_rounding(
    original: onnx.ModelProto, reduced: onnx.ModelProto, feeds: dict, rtol: float = 1e-5
) -> None:
    """Outputs agree within `rtol` of the magnitude of the sums that produce them (ReLU-type nets)."""
    scales = rounding_scale(original, feeds)
    for expected, actual, scale in zip(run(original, feeds), run(reduced, feeds), scales, strict=True):
        assert actual.shape == expected.shape
        assert np.all(np.abs(actual - expected) <= rtol * scale + 1e-30), (
            f"max error {np.abs(actual - expected).max()} vs scale {scale.max()}"
        )


# Off a terminal, long steps print plain progress lines on stderr ("condensing layers: 2/3 (0.1 s)",
# `condense_graph.progress`); an error is still exactly one line among them.
PROGRESS_LINE = re.compile(r"^[\w ,'-]+: \d+/\d+ \(\d+\.\d s\)$")


def message_lines(err: str) -> list[str]:
    """The stderr lines that are not progress lines."""
    return [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
