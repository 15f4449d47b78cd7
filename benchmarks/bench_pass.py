"""Time each stage of the pass on the issue's reference models, on one core.

- `mlp`: the paper's combustion MLP, 23-3200-1600-800-400-23 (6.8M params), random weights with
  planted condensation: every hidden layer's neurons are positive multiples of a third as many
  directions plus a little noise, so grouping at 0.95 has real work to do. Target: analysis +
  rewrite under 2 s.
- `mobilenet`: MobileNetV2 for 32x32 inputs and 10 classes (2,236,682 params), random weights,
  exported with torch. Target: under 3 s.
- `resnet50`: a ResNet-50-sized CNN (25.5M params, 224x224 inputs), random weights, exported with
  torch. Target: under 15 s.

BLAS threads are pinned to 1 before numpy loads and the process to one CPU. Prints one line per
stage, the median of --repeat runs.

    python benchmarks/bench_pass.py [--model mlp|mobilenet|resnet50|all] [--repeat 3] [--threshold 0.95]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from condense_graph.graph import export_like  # noqa: E402
from condense_graph.verify import compare_models  # noqa: E402
from passes.condense_channels import CondenseChannelsPass, rewrite  # noqa: E402

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


def torch_model(name: str) -> onnx.ModelProto:
    """Export a tests/torch_models.py architecture with random weights (needs torch)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from torch_models import MobileNetV2, randomize_batchnorm, resnet50_like

    torch.manual_seed(0)
    net, size = (MobileNetV2(), 32) if name == "mobilenet" else (resnet50_like(), 224)
    randomize_batchnorm(net.eval(), torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            net,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
        )
        return onnx.load(str(path))


def run_once(model: onnx.ModelProto, threshold: float) -> dict[str, float]:
    times, t0 = {}, time.perf_counter()
    condense = CondenseChannelsPass(threshold)
    graph, analysis = condense.analyze(model)
    times["analyze"], t0 = time.perf_counter() - t0, time.perf_counter()
    plans, store = condense.plan(graph, analysis)
    times["plan (similarity, grouping, merge)"], t0 = time.perf_counter() - t0, time.perf_counter()
    rewrite(graph, plans, store)
    reduced = export_like(graph, model)
    times["rewrite + export"], t0 = time.perf_counter() - t0, time.perf_counter()
    compare_models(model, reduced, runs=1)
    times["verify (ONNX Runtime, both models)"] = time.perf_counter() - t0
    times["widths"] = [(p.cmap.width_before, p.cmap.width_after) for p in plans]
    return times


def bench(name: str, repeat: int, threshold: float, target: float) -> None:
    t0 = time.perf_counter()
    model = paper_mlp() if name == "mlp" else torch_model(name)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"\n{name}: {params:,} params, built in {time.perf_counter() - t0:.2f} s")
    runs = [run_once(model, threshold) for _ in range(repeat)]
    widths = runs[0]["widths"]
    print(
        f"threshold {threshold}: {len(widths)} layers analyzed, total width "
        f"{sum(p[0] for p in widths)} -> {sum(p[1] for p in widths)}"
    )
    for r in runs:
        r.pop("widths")
    for stage in runs[0]:
        values = [r[stage] for r in runs]
        print(
            f"  {stage:<38} median {statistics.median(values):7.3f} s  (runs: "
            + ", ".join(f"{v:.3f}" for v in values)
            + ")"
        )
    total = [r["analyze"] + r["plan (similarity, grouping, merge)"] + r["rewrite + export"] for r in runs]
    label = f"analysis + rewrite (target < {target:g} s)"
    print(f"  {label:<38} median {statistics.median(total):7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "mobilenet", "resnet50", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    targets = {"mlp": 2.0, "mobilenet": 3.0, "resnet50": 15.0}
    for name in targets if args.model == "all" else [args.model]:
        bench(name, args.repeat, args.threshold, targets[name])


if __name__ == "__main__":
    main()
