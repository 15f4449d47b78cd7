"""Models the benchmarks build in code (numpy and onnx.helper only; torch architectures are in
`torch_models`, shared with the tests).

`mlp(widths)` is a Gemm + Relu MLP with planted condensation: every hidden layer's neurons are
positive multiples of a third as many directions plus noise. `paper_mlp()` is the paper's
combustion MLP, 23-3200-1600-800-400-23 (6.8M params), built that way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTHS = [23, 3200, 1600, 800, 400, 23]


def paper_mlp(seed: int = 0, noise: float = 0.02) -> onnx.ModelProto:
    return mlp(WIDTHS, seed, noise)


def mlp(widths: list[int], seed: int = 0, noise=0.02) -> onnx.ModelProto:
    """Gemm + Relu MLP; hidden neurons cluster around width/3 directions. `noise` is the spread of
    a neuron around its direction: a number, or (low, high) to draw one level per direction."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(1, len(widths)):
        fan_in, width = widths[i - 1], widths[i]
        var = ((fan_in + width) / 2) ** -2  # paper eq. 19
        base = rng.normal(0, np.sqrt(var), size=(max(width // 3, 1), fan_in + 1))
        which = rng.integers(0, len(base), width)
        rows = base[which] * rng.uniform(0.5, 2.0, (width, 1))
        level = np.exp(rng.uniform(*np.log(noise), len(base)))[which, None] if np.ndim(noise) else noise
        rows += level * np.sqrt(var) * rng.normal(size=rows.shape)
        inits += [
            numpy_helper.from_array(rows[:, :-1].astype(np.float32), f"fc{i}.weight"),
            numpy_helper.from_array(rows[:, -1].astype(np.float32), f"fc{i}.bias"),
        ]
        nodes.append(
            helper.make_node(
                "Gemm", [cur, f"fc{i}.weight", f"fc{i}.bias"], [f"h{i}"], name=f"fc{i}", transB=1
            )
        )
        cur = f"h{i}"
        if i < len(widths) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"a{i}"], name=f"relu{i}"))
            cur = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "paper_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
