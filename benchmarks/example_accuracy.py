"""Held-out accuracy of the shipped example model after reduction at several thresholds.

No retraining: this is what the merge alone costs. Prints params, widths, the held-out MSE
against the true targets and the max deviation from the original model's outputs.

    python benchmarks/example_accuracy.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

import condense_graph as cg

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def predict(model, states: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"state": states})[0]


def main() -> None:
    data = np.load(EXAMPLES / "drm19_states.npz")
    states, target = data["state"], data["rate"]
    original = cg.condense(EXAMPLES / "drm19_mlp.onnx", threshold=1.0)
    reference = predict(original.model, states)
    print(f"{'threshold':>9} {'params':>8} {'widths':>16} {'held-out MSE':>13} {'max |dy|':>9}")
    for threshold in (1.0, 0.999, 0.99, 0.98, 0.95):
        result = cg.condense(EXAMPLES / "drm19_mlp.onnx", threshold=threshold)
        out = predict(result.model, states)
        widths = "-".join(str(layer["width_after"]) for layer in result.report["layers"])
        mse = float(np.mean((out - target) ** 2))
        print(
            f"{threshold:>9} {result.report['params_after']:>8,} {widths:>16} {mse:>13.4f}"
            f" {float(np.abs(out - reference).max()):>9.3g}"
        )


if __name__ == "__main__":
    main()
