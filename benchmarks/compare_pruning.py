"""Same-size comparison: the default selection rule (structured OBS) against the paper's merge and
magnitude pruning, no retraining.

Models (all trained, all on real data that ships with the repo or scikit-learn; see
`compare_models.py`): the DRM19 methane surrogate MLP (examples/drm19_mlp.onnx, task metric MSE
against the true rates), a small CNN on scikit-learn's digits and a small MobileNetV2-style CNN
(inverted blocks without the residual Add) on the same digits (task metric accuracy). Calibration
data (1000 states, 300 training images) is disjoint from the evaluation data (the other 1000 states,
the 597 test images).

At 90%, 70%, 50% and 30% of the parameters, with the same kept widths for every method (the widths
`cg.condense(model, target_params=size)` picks):
  paper            the paper's merge (eq. 10-12), `method="condense"`, no data;
  obs (default)    `method="auto"` with calibration data: exact merges of positive multiples,
                   greedy structured Optimal Brain Surgeon on each consumer's input Gram, then the
                   least-squares refit of the consumers;
  condense+refit   the paper's grouping with the same refit (`method="condense"` with calibration:
                   the data-aware default before obs);
  magnitude        Torch-Pruning's MagnitudeImportance (L2) with its DependencyGraph on the PyTorch
                   model, exported to ONNX;
  magnitude+refit  magnitude pruning in condense-graph with the refit (`method="magnitude"` with
                   calibration).
And one row that picks its own widths:
  obs (global widths)  `cg.condense(model, target_params=size, calibration=calib)`: structured OBS
                   with per-layer widths allocated globally by the OBS costs (condense_graph/allocate.py),
                   keeping at most `size` of the parameters (as the library counts them), with the same
                   calibration rows (a size target holds none out). Its params are its own, so it is
                   left out of the equal-size check and compared with obs (default) per size.
Output error = RMS(reduced - original outputs) / RMS(original outputs) on the evaluation data.
Params = weights and biases (tensors with a dimension; the scalar Clip bounds of ReLU6 left out).
Time = the wall time of the call that made the model (for paper it includes the width search of
`target_params`; for magnitude it is Torch-Pruning's dependency graph and pruning, not the export).
Writes a table per model, the kept widths of obs (default) and obs (global widths), the ratios
(magnitude+refit error) / (obs error) and (obs error) / (obs global error) per size, into
benchmarks/RESULTS.md and the plot benchmarks/compare.png.

    pip install torch-pruning scikit-learn matplotlib   (with the torch pin of constraints.txt)
    python benchmarks/compare_pruning.py [--models mlp cnn mobilenet]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import onnx
import torch_pruning as tp
from compare_models import TASKS, export, run
from results import write_section
from torch import nn

import condense_graph as cg

HERE = Path(__file__).resolve().parent
SIZES = [0.9, 0.7, 0.5, 0.3]
OBS = "obs (default)"
GLOBAL = "obs (global widths)"
UNIFORM = ["paper", OBS, "condense+refit", "magnitude", "magnitude+refit"]  # the same widths
METHODS = UNIFORM + [GLOBAL]


def torch_pruning_magnitude(task, widths: dict[str, int]) -> onnx.ModelProto:
    """Torch-Pruning's DependencyGraph + MagnitudeImportance(p=2), each layer to the given width.
    `widths` is keyed by the ONNX layer names, which end in the PyTorch module names."""
    net = copy.deepcopy(task["torch"]).eval()
    modules = dict(net.named_modules())
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=task["example"])
    importance = tp.importance.MagnitudeImportance(p=2)
    for layer_name, width in widths.items():
        module_name = layer_name.strip("/").split("/")[-2]  # "/features/features.1/features.1.2/Conv"
        if module_name not in task["prunable"]:
            raise KeyError(f"no prunable module {module_name!r} for layer {layer_name!r}")
        layer = modules[module_name]
        conv = isinstance(layer, nn.Conv2d)
        prune = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        count = layer.out_channels if conv else layer.out_features
        group = graph.get_pruning_group(layer, prune, idxs=list(range(count)))
        scores = importance(group).detach().cpu().numpy()
        drop = np.argsort(scores, kind="stable")[: count - width].tolist()
        if drop:
            graph.get_pruning_group(layer, prune, idxs=drop).prune()
    return net


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    out = call(*args, **kwargs)
    return out, time.perf_counter() - start


def methods(task, size: float) -> tuple[dict[str, tuple[onnx.ModelProto, float]], dict]:
    """Every method's model at `size` and the seconds its call took; the kept widths of the
    uniform rows and of the global allocation."""
    paper, paper_s = timed(cg.condense, task["onnx"], target_params=size, method="condense")
    widths = {layer["name"]: layer["width_after"] for layer in paper.report["layers"]}
    calib = {task["name"]: task["calib"]}
    models = {"paper": (paper.model, paper_s)}
    for label, method in ((OBS, "auto"), ("condense+refit", "condense")):
        result, seconds = timed(
            cg.condense, task["onnx"], layer_widths=widths, calibration=calib, method=method
        )
        models[label] = (result.model, seconds)
    net, seconds = timed(torch_pruning_magnitude, task, widths)
    models["magnitude"] = (export(net, task["example"], task["name"]), seconds)
    result, seconds = timed(
        cg.condense, task["onnx"], layer_widths=widths, calibration=calib, method="magnitude"
    )
    models["magnitude+refit"] = (result.model, seconds)
    result, seconds = timed(cg.condense, task["onnx"], target_params=size, calibration=calib)
    models[GLOBAL] = (result.model, seconds)
    allocated = {layer["name"]: layer["width_after"] for layer in result.report["layers"]}
    return models, {"uniform": widths, "global": allocated}


def count(model: onnx.ModelProto) -> int:
    """Weights and biases: elements of the initializers and Constant nodes with at least one
    dimension. Scalars are left out: the Clip bounds of ReLU6 are Constant nodes in a PyTorch
    export (16 in the MobileNet) and two shared initializers after condense-graph's folding."""
    tensors = list(model.graph.initializer) + [
        a.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for a in node.attribute
        if a.name == "value"
    ]
    return sum(int(np.prod(t.dims)) for t in tensors if len(t.dims) > 0)


def evaluate(task) -> tuple[list[dict], dict[float, dict]]:
    reference = run(task["onnx"], task["name"], task["eval"])
    metric_name, metric = task["metric"]
    rows = [
        {
            "size": 1.0,
            "method": "original",
            "params": count(task["onnx"]),
            "error": 0.0,
            "metric": metric(reference),
            "seconds": 0.0,
        }
    ]
    print(f"original params {rows[0]['params']:>7,} {metric_name} {rows[0]['metric']:.4f}", flush=True)
    widths = {}
    for size in SIZES:
        cell = []
        models, widths[size] = methods(task, size)
        for method, (model, seconds) in models.items():
            out = run(model, task["name"], task["eval"])
            error = float(np.sqrt(np.mean((out - reference) ** 2)) / np.sqrt(np.mean(reference**2)))
            row = dict(size=size, method=method, params=count(model), error=error, metric=metric(out))
            cell.append(row | {"seconds": seconds})
            print(
                f"{size:.0%} {method:<19} params {row['params']:>7,} output error {error:.4f} "
                f"{metric_name} {row['metric']:.4f}  time {seconds:6.2f} s",
                flush=True,
            )
        uniform = [r["params"] for r in cell if r["method"] in UNIFORM]
        if len(set(uniform)) != 1:
            print(f"WARNING: {size:.0%}: the uniform-width methods kept different sizes: {uniform}")
        rows += cell
    return rows, widths


def metric_comparison(
    ours: dict, theirs: dict, metric_name: str, higher_is_better: bool, every: str, them: str
) -> str:
    """Where `ours` has a worse task metric than `theirs` (per size), as a clause of a summary line."""
    sign = 1 if higher_is_better else -1
    worse = [
        f"{s:.0%} ({ours[s]['metric']:.4f} vs {theirs[s]['metric']:.4f})"
        for s in SIZES
        if sign * (ours[s]["metric"] - theirs[s]["metric"]) < 0
    ]
    if not worse:
        return f"its {metric_name} is at least as good {every}"
    return f"its {metric_name} is worse than {them} at " + ", ".join(worse)


def summary(name: str, rows: list[dict], metric_name: str, higher_is_better: bool) -> str:
    """(magnitude+refit error) / (obs error) per size, the cells where obs's error is not lower,
    and the cells where its task metric is worse than magnitude+refit's."""

    def cell(size, method):
        return next(r for r in rows if r["size"] == size and r["method"] == method)

    obs = {s: cell(s, OBS) for s in SIZES}
    mag = {s: cell(s, "magnitude+refit") for s in SIZES}
    ratios = ", ".join(f"{s:.0%}: {mag[s]['error'] / max(obs[s]['error'], 1e-30):.2f}x" for s in SIZES)
    worse = [
        f"{s:.0%} (obs {obs[s]['error']:.4f} vs magnitude+refit {mag[s]['error']:.4f})"
        for s in SIZES
        if obs[s]["error"] >= mag[s]["error"]
    ]
    verdict = (
        "obs's output error is lower in every cell"
        if not worse
        else "obs's output error is NOT lower than magnitude+refit's at " + ", ".join(worse)
    )
    metric_text = metric_comparison(
        obs, mag, metric_name, higher_is_better, "in every cell", "magnitude+refit's"
    )
    return f"{name}: error(magnitude+refit) / error(obs) = {ratios}; {verdict}; {metric_text}."


def global_summary(name: str, rows: list[dict], metric_name: str, higher_is_better: bool) -> str:
    """(obs error) / (obs global error) per size with the params each kept, and where the global
    allocation is worse (output error or task metric)."""

    def cell(size, method):
        return next(r for r in rows if r["size"] == size and r["method"] == method)

    uni = {s: cell(s, OBS) for s in SIZES}
    glo = {s: cell(s, GLOBAL) for s in SIZES}
    ratios = ", ".join(
        f"{s:.0%}: {uni[s]['error'] / max(glo[s]['error'], 1e-30):.2f}x "
        f"({glo[s]['params']:,} vs {uni[s]['params']:,} params)"
        for s in SIZES
    )
    better = [f"{s:.0%}" for s in SIZES if glo[s]["error"] < uni[s]["error"]]
    worse = [
        f"{s:.0%} (global {glo[s]['error']:.4f} vs uniform {uni[s]['error']:.4f})"
        for s in SIZES
        if glo[s]["error"] >= uni[s]["error"]
    ]
    if not worse:
        verdict = "the global allocation beats uniform widths at every size"
    elif not better:
        verdict = "the global allocation does NOT beat uniform widths at any size: " + ", ".join(worse)
    else:
        verdict = (
            f"the global allocation beats uniform widths at {', '.join(better)} and does NOT at "
            + ", ".join(worse)
        )
    metric_text = metric_comparison(glo, uni, metric_name, higher_is_better, "at every size", "uniform obs's")
    return (
        f"{name}: error(obs, uniform widths) / error(obs, global widths) = {ratios}; {verdict}; "
        f"{metric_text}."
    )


def widths_text(name: str, widths: dict[float, dict]) -> str:
    """The kept widths per size, in layer order: uniform (every uniform row) / global."""
    layers = list(widths[SIZES[0]]["uniform"])
    parts = [
        f"{s:.0%}: {'-'.join(str(widths[s]['uniform'][n]) for n in layers)} / "
        f"{'-'.join(str(widths[s]['global'].get(n, '?')) for n in layers)}"
        for s in SIZES
    ]
    return f"Kept widths of {name} ({', '.join(layers)}), uniform / global: " + "; ".join(parts) + "."


def plot(results: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.6))
    for ax, (name, rows) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for method in METHODS:
            pts = [(r["params"], r["error"]) for r in rows if r["method"] == method]
            style = {"linewidth": 2.5 if method in (OBS, GLOBAL) else 1.2}
            if method == GLOBAL:
                style |= {"linestyle": "--", "marker": "s"}
            ax.plot(*zip(*pts, strict=True), **({"marker": "o"} | style), label=method)
        ax.set_yscale("log")
        ax.set_xlabel("parameters after reduction")
        ax.set_ylabel("relative output error (held-out)")
        ax.set_title(f"{name}: no retraining")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(name: str, rows: list[dict], metric_name: str) -> str:
    lines = [
        f"**{name}** ({rows[0]['params']:,} parameters; {metric_name} of the original: "
        f"{rows[0]['metric']:.4f})",
        "",
        f"| size | method | params | output error | {metric_name} | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[1:]:
        lines.append(
            f"| {r['size']:.0%} | {r['method']} | {r['params']:,} | {r['error']:.4f} | "
            f"{r['metric']:.4f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--no-write", action="store_true", help="print only (no RESULTS.md, no plot)")
    args = parser.parse_args()
    results, sections, summaries, global_summaries = {}, [], [], []
    for name in args.models:
        start = time.perf_counter()
        task = TASKS[name]()
        print(f"--- {name} (built in {time.perf_counter() - start:.1f} s)", flush=True)
        results[name], widths = evaluate(task)
        sections.append(table(name, results[name], task["metric"][0]) + "\n\n" + widths_text(name, widths))
        summaries.append(summary(name, results[name], task["metric"][0], task["higher_is_better"]))
        global_summaries.append(
            global_summary(name, results[name], task["metric"][0], task["higher_is_better"])
        )
        print(summaries[-1], global_summaries[-1], sep="\n", flush=True)
    if args.no_write:
        return
    plot(results, HERE / "compare.png")
    write_section(
        "compare",
        "The default rule (structured OBS) against the paper's merge and magnitude pruning at equal "
        "size, and OBS with global per-layer widths (no retraining)",
        "Rerun: `python benchmarks/compare_pruning.py` (needs torch-pruning, scikit-learn). "
        "Plot: `compare.png`. Same kept widths for every method (from `target_params`); paper = "
        '`method="condense"` without data; obs (default) = `method="auto"` with calibration data; '
        'condense+refit = `method="condense"` with calibration data; magnitude = Torch-Pruning '
        'MagnitudeImportance(L2), no refit; magnitude+refit = `method="magnitude"` with calibration '
        "data. obs (global widths) = `cg.condense(model, target_params=size, calibration=...)`: "
        "per-layer widths allocated globally by the OBS costs, at most `size` of the parameters, "
        "with the same calibration rows; its params are its own (the other rows share one size). "
        "Output error = RMS(reduced - original) / RMS(original) on held-out data. Time = the call "
        "that made the model (paper: with the width search; magnitude: Torch-Pruning without the "
        "export; obs (global widths): with the allocation).\n\n"
        + "\n\n".join(sections)
        + "\n\nEqual size (the uniform rows):\n\n"
        + "\n".join(f"- {s}" for s in summaries)
        + "\n\nGlobal against uniform widths (obs both; > 1x: global is better):\n\n"
        + "\n".join(f"- {s}" for s in global_summaries),
    )


if __name__ == "__main__":
    main()
