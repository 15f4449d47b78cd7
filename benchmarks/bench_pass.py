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
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402
from models import paper_mlp  # noqa: E402

import condense_graph as cg  # noqa: E402
from condense_graph.verify import compare_models  # noqa: E402
from passes import CondenseChannelsPass, CondenseOptions  # noqa: E402

STAGES = {
    "analyze": "analyze",
    "plan": "plan (similarity, grouping, merge)",
    "rewrite": "rewrite + export",
}


def torch_model(name: str) -> onnx.ModelProto:
    """Export a torch_models.py architecture with random weights (needs torch)."""
    import torch
    from torch_models import MobileNetV2, export, randomize_batchnorm, resnet50_like

    torch.manual_seed(0)
    net, size = (MobileNetV2(), 32) if name == "mobilenet" else (resnet50_like(), 224)
    randomize_batchnorm(net.eval(), torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        return export(net, torch.randn(1, 3, size, size), False, path)


def run_once(model: onnx.ModelProto, threshold: float) -> dict[str, float]:
    """Seconds of each stage, from the pass's own `timings`, then of verifying its result."""
    result = CondenseChannelsPass(CondenseOptions(threshold))(model)
    times = {label: result.timings[stage] for stage, label in STAGES.items()}
    t0 = time.perf_counter()
    compare_models(model, result.model, runs=1)
    times["verify (ONNX Runtime, both models)"] = time.perf_counter() - t0
    times["widths"] = [(p.cmap.width_before, p.cmap.width_after) for p in result.plans]
    return times


def bench(name: str, repeat: int, threshold: float, target: float) -> None:
    t0 = time.perf_counter()
    model = paper_mlp() if name == "mlp" else torch_model(name)
    params = cg.count_params(model)
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
    total = [sum(r[label] for label in STAGES.values()) for r in runs]
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
