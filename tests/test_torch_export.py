"""Planted duplicates in PyTorch MLPs, exported with both torch exporters, then reduced."""

import numpy as np
import pytest
from builders import planted_rows
from conftest import assert_same_outputs, check_full

import condense_graph as cg

torch = pytest.importorskip("torch")
from torch_models import export  # noqa: E402


def planted_torch_mlp(widths, distinct, activation, seed):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(1, len(widths)):
        linear = torch.nn.Linear(widths[i - 1], widths[i])
        if i < len(widths) - 1:
            rows = planted_rows(rng, widths[i], distinct[i - 1], widths[i - 1])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(rows[:, :-1]))
                linear.bias.copy_(torch.from_numpy(rows[:, -1]))
            layers += [linear, activation()]
        else:
            layers.append(linear)
    return torch.nn.Sequential(*layers).eval()


CASES = [
    ([5, 12, 3], [4]),
    ([5, 12, 10, 3], [4, 6]),
    ([6, 16, 12, 10, 2], [5, 3, 7]),
    ([7, 20, 16, 12, 8, 3], [6, 4, 5, 2]),
]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"depth{i + 1}")
def test_exported_relu_mlp_reduces_exactly(case, dynamo, tmp_path, rng):
    widths, distinct = CASES[case]
    module = planted_torch_mlp(widths, distinct, torch.nn.ReLU, seed=case)
    x = torch.from_numpy(rng.normal(size=(6, widths[0])).astype(np.float32))
    model = export(module, x, dynamo, tmp_path / "m.onnx", dynamic_batch=True)
    result = cg.condense(model, threshold=0.9999)
    assert [layer["width_after"] for layer in result.report["layers"]] == distinct
    check_full(result.model)
    assert_same_outputs(model, result.model, {"x": x.numpy()})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(
    "activation,exact", [(torch.nn.GELU, False), (torch.nn.SiLU, False), (torch.nn.LeakyReLU, True)]
)
def test_exported_activations_on_sequences(activation, exact, dynamo, tmp_path, rng):
    module = planted_torch_mlp([6, 16, 12, 3], [5, 4], activation, seed=7)
    x = torch.from_numpy(rng.normal(size=(2, 9, 6)).astype(np.float32))  # [batch, seq, features]
    model = export(module, x, dynamo, tmp_path / "m.onnx", dynamic_batch=True)
    result = cg.condense(model, threshold=0.9999)
    layers = result.report["layers"]
    assert [layer["width_after"] for layer in layers] == [5, 4]
    assert all(layer["exact"] == exact for layer in layers)
    check_full(result.model)
    if exact:
        assert_same_outputs(model, result.model, {"x": x.numpy()})
