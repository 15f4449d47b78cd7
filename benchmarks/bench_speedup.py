"""ONNX Runtime speedup against the reduction in multiply-accumulates; writes benchmarks/RESULTS.md.

For the paper's MLP (planted condensation with a spread of tightness, so thresholds sweep the
reduction) and MobileNetV2 for 32x32 inputs (random weights with planted, noisy condensation in the
expand/depthwise channels), reduce at several thresholds and benchmark original vs reduced, at
batch 1 and 256, interleaved runs, one intra-op thread. "Ideal" is the MAC ratio; "efficiency" is
measured / ideal (target: >= 0.8 for the MLP at batch 256). Also writes benchmarks/speedup.png
when matplotlib is installed.

    python benchmarks/bench_speedup.py [--runs 20] [--round-to 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from models import WIDTHS, mlp
from results import write_section

import condense_graph as cg
from condense_graph.bench import benchmark

THRESHOLDS = {"mlp": [0.999, 0.99, 0.97, 0.95, 0.9], "mobilenet": [0.999, 0.99, 0.97, 0.95]}


def condensed_mobilenet(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 whose expand/depthwise channels cluster in groups of ~3 with noise of varying size."""
    import torch
    from torch_models import MobileNetV2, randomize_batchnorm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MobileNetV2().eval()
    randomize_batchnorm(net, gen)
    with torch.no_grad():
        for block in net.features[1:-1]:
            dw, bn = block.conv[-3][0], block.conv[-3][1]
            channels = dw.weight.shape[0]
            mains = torch.randint(0, max(channels // 3, 1), (channels,), generator=gen)
            noise = torch.exp(torch.empty(channels).uniform_(np.log(1e-3), np.log(0.5), generator=gen))
            for k in range(channels):
                m = int(mains[k])
                dw.weight[k] = dw.weight[m] * (1 + noise[k] * torch.randn(dw.weight[m].shape, generator=gen))
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    t[k] = t[m]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mnv2.onnx"
        torch.onnx.export(
            net,
            (torch.randn(1, 3, 32, 32),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
        return onnx.load(str(path))


def sweep(name: str, model: onnx.ModelProto, runs: int, round_to: int) -> list[dict]:
    rows = []
    for threshold in THRESHOLDS[name]:
        reduced = cg.condense(model, threshold=threshold, round_to=round_to).model
        for batch in (1, 256):
            n = runs if batch == 1 or name == "mlp" else max(3, runs // 4)
            result = benchmark(
                [("original", model, model.ByteSize()), ("reduced", reduced, reduced.ByteSize())],
                batch=batch,
                threads=1,
                runs=n,
                warmup=2,
            )
            base, red = result["models"]
            row = {
                "model": name,
                "threshold": threshold,
                "batch": batch,
                "params": red["params"],
                "ideal": red["ideal_speedup"],
                "speedup": red["speedup"],
                "efficiency": red["efficiency"],
                "median_ms": (base["median_ms"], red["median_ms"]),
                "runs": n,
            }
            print(
                f"{name} t={threshold} batch={batch}: ideal {row['ideal']:.2f}x measured "
                f"{row['speedup']:.2f}x ({row['efficiency']:.2f})",
                flush=True,
            )
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for (name, batch), marker in zip([(m, b) for m in THRESHOLDS for b in (1, 256)], "osv^", strict=True):
        pts = [(r["ideal"], r["speedup"]) for r in rows if r["model"] == name and r["batch"] == batch]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="", label=f"{name}, batch {batch}")
    top = max(max(r["ideal"], r["speedup"]) for r in rows) * 1.05
    ax.plot([1, top], [1, top], "k--", lw=1, label="ideal (MAC ratio)")
    ax.plot([1, top], [0.8, 0.8 * top], "k:", lw=1, label="0.8 x ideal")
    ax.set_xlabel("ideal speedup (MACs before / after)")
    ax.set_ylabel("measured ONNX Runtime speedup (median)")
    ax.set_title("Speedup against MAC reduction (1 thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--round-to", type=int, default=1)
    args = parser.parse_args()
    rows = sweep("mlp", mlp(WIDTHS, noise=(0.003, 1.0)), args.runs, args.round_to)
    rows += sweep("mobilenet", condensed_mobilenet(), args.runs, args.round_to)
    plot(rows, Path(__file__).resolve().parent / "speedup.png")
    table = [
        "| model | threshold | batch | params after | ideal (MAC ratio) | measured | efficiency "
        "| median ms before / after | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['threshold']} | {r['batch']} | {r['params']:,} | {r['ideal']:.2f}x | "
            f"{r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['median_ms'][0]:.3f} / "
            f"{r['median_ms'][1]:.3f} | {r['runs']} |"
        )
    write_section(
        f"speedup-round{args.round_to}",
        f"ONNX Runtime speedup against MAC reduction (round-to {args.round_to})",
        "One intra-op thread, interleaved runs, medians. Rerun: "
        f"`python benchmarks/bench_speedup.py --round-to {args.round_to}`. Plot: `speedup.png`.\n\n"
        + "\n".join(table),
    )


if __name__ == "__main__":
    main()
