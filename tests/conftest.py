import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from builders import run  # noqa: E402,F401


def assert_same_outputs(original: onnx.ModelProto, reduced: onnx.ModelProto, feeds: dict,
                        rtol: float = 1e-5) -> None:
    """Outputs agree within `rtol` relative to each output's largest magnitude."""
    for expected, actual in zip(run(original, feeds), run(reduced, feeds)):
        assert actual.shape == expected.shape
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def check_full(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
