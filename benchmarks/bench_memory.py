"""Peak memory of a data-aware reduction of a ResNet-50-sized CNN; writes benchmarks/RESULTS.md.

A ResNet-50-sized CNN (25.5M params, random weights, 32x32 inputs) is reduced to --target-params of
its parameters with --images random calibration images (the data-aware merge: activations captured
with ONNX Runtime batch by batch, consumers refit by least squares). Prints and records the peak
resident memory of the process (target: under 4 GB) and the wall time.

    python benchmarks/bench_memory.py [--images 2000] [--target-params 0.7]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from results import write_section

import condense_graph as cg


def resnet50_onnx(size: int) -> onnx.ModelProto:
    import torch
    from torch_models import export, randomize_batchnorm, resnet50_like

    torch.manual_seed(0)
    net = resnet50_like(num_classes=10).eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50.onnx"
        return export(net, torch.randn(1, 3, size, size), False, path, dynamic_batch=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--target-params", type=float, default=0.7)
    args = parser.parse_args()
    model = resnet50_onnx(args.size)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    images = np.random.default_rng(0).normal(size=(args.images, 3, args.size, args.size)).astype(np.float32)
    before = peak_rss_gb()
    start = time.perf_counter()
    result = cg.condense(model, target_params=args.target_params, calibration={"x": images})
    seconds = time.perf_counter() - start
    peak = peak_rss_gb()
    refits = sum(1 for layer in result.report["layers"] for c in layer.get("refit", []) if c["refit"])
    line = (
        f"| {params / 1e6:.1f}M | {args.images} x 3x{args.size}x{args.size} | {args.target_params} | "
        f"{result.report['params_after'] / 1e6:.1f}M | {refits} | {peak:.2f} GB (model + data loaded: "
        f"{before:.2f} GB) | {seconds:.0f} s |"
    )
    print(line)
    write_section(
        "memory",
        "Memory of a data-aware reduction (ResNet-50-sized CNN)",
        "Rerun: `python benchmarks/bench_memory.py`. Peak RSS of the whole process, target < 4 GB.\n\n"
        "| params | calibration images | target params | params after | consumers refit | peak RSS | time |\n"
        "|---|---|---|---|---|---|---|\n" + line,
    )


if __name__ == "__main__":
    main()
