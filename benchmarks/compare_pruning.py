"""Same-size comparison: condensation (paper, data-aware) against magnitude pruning, no retraining.

Models (both trained, both with real data):
- mlp: the shipped DRM19 methane surrogate (examples/drm19_mlp.onnx); calibration = the first 1000
  held-out states of examples/drm19_states.npz, evaluation = the other 1000; task metric = MSE
  against the true rates.
- cnn: a small CNN (3 conv + BN + ReLU, global pooling, linear head) trained here on scikit-learn's
  digits (8x8 images that ship with the package); calibration = 300 training images, evaluation =
  the 597 test images; task metric = accuracy.

At 90%, 70%, 50% and 30% of the parameters, with the same kept widths for every method:
  (a) paper: the paper's merge (eq. 10-12), widths from `target_params`;
  (b) data-aware: the same widths, consumers refit on the calibration data;
  (c) magnitude: Torch-Pruning's MagnitudeImportance (L2) with its DependencyGraph on the PyTorch
      model, exported to ONNX;
  (d) magnitude + refit: magnitude pruning in condense-graph with the same least-squares refit.
Output error = RMS(reduced - original outputs) / RMS(original outputs) on the evaluation data.
Writes a table into benchmarks/RESULTS.md and the plot benchmarks/compare.png.

    pip install torch-pruning scikit-learn matplotlib   (with the torch pin of constraints.txt)
    python benchmarks/compare_pruning.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch_pruning as tp
from results import write_section
from torch import nn

import condense_graph as cg

HERE = Path(__file__).resolve().parent
SIZES = [0.9, 0.7, 0.5, 0.3]
METHODS = ["paper", "data-aware", "magnitude", "magnitude+refit"]


def run(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})[0]


def export(module: nn.Module, example: torch.Tensor, name: str) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[name],
            dynamic_axes={name: {0: "batch"}},
        )
        return onnx.load(str(path))


# ---- the two tasks ---------------------------------------------------------------------------


def mlp_task():
    model = onnx.load(str(HERE.parent / "examples/drm19_mlp.onnx"))
    data = np.load(HERE.parent / "examples/drm19_states.npz")
    weights = {
        t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer
    }
    torch_model = nn.Sequential(
        nn.Linear(23, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 23),
    )
    torch_model.load_state_dict(weights)
    x, y = data["state"], data["rate"]
    metric = ("held-out MSE", lambda out: float(np.mean((out - y[1000:]) ** 2)))
    return dict(
        name="state",
        onnx=model,
        torch=torch_model,
        calib=x[:1000],
        eval=x[1000:],
        metric=metric,
        prunable=[torch_model[0], torch_model[2], torch_model[4]],
        example=torch.from_numpy(x[:2]),
    )


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def cnn_task():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1200], order[1200:]
    torch.manual_seed(0)
    net = DigitsCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for _ in range(40):
        for batch in torch.randperm(len(train)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xs[batch]), ys[batch]).backward()
            optimizer.step()
    net.eval()
    example = torch.from_numpy(images[:2])
    metric = ("accuracy", lambda out: float(np.mean(out.argmax(1) == labels[test])))
    features = net.features
    return dict(
        name="x",
        onnx=export(net, example, "x"),
        torch=net,
        calib=images[train[:300]],
        eval=images[test],
        metric=metric,
        prunable=[features[0], features[3], features[7]],
        example=example,
    )


# ---- the four methods ------------------------------------------------------------------------


def torch_pruning_magnitude(task, widths: list[int]) -> onnx.ModelProto:
    """Torch-Pruning's DependencyGraph + MagnitudeImportance(p=2), each layer to the given width."""
    import copy

    net = copy.deepcopy(task["torch"]).eval()
    layers = [
        dict(net.named_modules())[n]
        for n, m in task["torch"].named_modules()
        if any(m is p for p in task["prunable"])
    ]
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=task["example"])
    importance = tp.importance.MagnitudeImportance(p=2)
    for layer, width in zip(layers, widths):
        prune = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
        count = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        group = graph.get_pruning_group(layer, prune, idxs=list(range(count)))
        scores = importance(group).detach().cpu().numpy()
        drop = np.argsort(scores, kind="stable")[: count - width].tolist()
        if drop:
            graph.get_pruning_group(layer, prune, idxs=drop).prune()
    return export(net, task["example"], task["name"])


def methods(task, size: float) -> dict[str, onnx.ModelProto]:
    paper = cg.condense(task["onnx"], target_params=size)
    widths = {layer["name"]: layer["width_after"] for layer in paper.report["layers"]}
    calib = {task["name"]: task["calib"]}
    return {
        "paper": paper.model,
        "data-aware": cg.condense(task["onnx"], layer_widths=widths, calibration=calib).model,
        "magnitude": torch_pruning_magnitude(task, list(widths.values())),
        "magnitude+refit": cg.condense(
            task["onnx"], layer_widths=widths, similarity="magnitude", calibration=calib
        ).model,
    }


def evaluate(task) -> list[dict]:
    reference = run(task["onnx"], task["name"], task["eval"])
    params0 = cg.condense(task["onnx"], threshold=1.0).report["params_before"]
    metric_name, metric = task["metric"]
    rows = [{"size": 1.0, "method": "original", "params": params0, "error": 0.0, "metric": metric(reference)}]
    for size in SIZES:
        for method, model in methods(task, size).items():
            out = run(model, task["name"], task["eval"])
            error = float(np.sqrt(np.mean((out - reference) ** 2)) / np.sqrt(np.mean(reference**2)))
            params = cg.condense(model, threshold=1.0).report["params_before"]
            rows.append(
                {"size": size, "method": method, "params": params, "error": error, "metric": metric(out)}
            )
            print(
                f"{size:.0%} {method:<16} params {params:>7,} output error {error:.4f} "
                f"{metric_name} {metric(out):.4f}",
                flush=True,
            )
    return rows


def plot(results: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.6))
    for ax, (name, rows) in zip(np.atleast_1d(axes), results.items()):
        for method in METHODS:
            pts = [(r["params"], r["error"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("parameters after reduction")
        ax.set_ylabel("relative output error (held-out)")
        ax.set_title(f"{name}: same widths, no retraining")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(name: str, rows: list[dict], metric_name: str) -> str:
    lines = [
        f"**{name}** ({metric_name} of the original: {rows[0]['metric']:.4f})",
        "",
        "| size | method | params | output error | " + metric_name + " |",
        "|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['size']:.0%} | {r['method']} | {r['params']:,} | {r['error']:.4f} | {r['metric']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    results, sections = {}, []
    for name, make in (("mlp", mlp_task), ("cnn", cnn_task)):
        task = make()
        print(f"--- {name}")
        results[name] = evaluate(task)
        sections.append(table(name, results[name], task["metric"][0]))
    plot(results, HERE / "compare.png")
    write_section(
        "compare",
        "Condensation against magnitude pruning at equal size (no retraining)",
        "Rerun: `python benchmarks/compare_pruning.py` (needs torch-pruning, scikit-learn). "
        "Plot: `compare.png`.\n\n" + "\n\n".join(sections),
    )


if __name__ == "__main__":
    main()
