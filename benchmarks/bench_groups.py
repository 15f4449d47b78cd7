"""What reducing coupled channel groups (issue 13) adds to the ONNX Runtime speedup.

Two networks built here with random weights and randomized BatchNorm statistics: a ResNet-18-style
net (BasicBlocks [2, 2, 2, 2], stride-2 blocks with a 1x1 conv + BN shortcut: the stem and every
block's last conv of a stage share channels through Add) and a MobileNetV3-small-style net
(inverted residuals, depthwise convs, Hardswish, squeeze-excitation gates with Hardsigmoid: the
gated layers are coupled to their gates). Each is reduced to about half its MACs
(`target_macs=0.5`, `round_to=16`, standard normal calibration rows) twice: with every coupled
group free, and with every group held at its full width (`layer_widths`). Original and reduced
models run interleaved in one ONNX Runtime process (CPU, one intra-op thread, then the default
threads), medians of the run times; speedup = median(original) / median(reduced).

Random weights have no condensation: the merges are not exact and the errors are large. This
measures speed, not accuracy.

    PYTHONPATH=. python benchmarks/bench_groups.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch_models
from results import RESULTS, write_section
from torch import nn
from torch_models import randomize_batchnorm

import condense_graph as cg
from condense_graph.bench import bench_feeds, count_macs, interleaved_times, latency_summary, make_session

SECTION = "## Coupled groups: speedup (issue 13)"


# ---- networks ---------------------------------------------------------------------------------


def conv_bn(inp: int, out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(out)
    )


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs; a stride-2 (or widening) block has a 1x1 conv + BN shortcut."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(inp, out, 3, stride), nn.ReLU(), conv_bn(out, out, 3))
        self.skip = conv_bn(inp, out, 1, stride) if stride != 1 or inp != out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNet18(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 3, 1), nn.ReLU())
        layers, inp = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            for b in range(n):
                layers.append(BasicBlock(inp, width, 2 if b == 0 and i > 0 else 1))
                inp = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(inp, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(pool x)))), MobileNetV3's gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(scale))))


class InvertedResidual(nn.Module):
    """[expand 1x1 -> BN -> act] -> depthwise -> BN -> act -> [SE] -> project 1x1 -> BN (+ x)."""

    def __init__(self, inp, hidden, out, kernel, stride, act, se: bool):
        super().__init__()
        self.expand = nn.Sequential(conv_bn(inp, hidden), act()) if hidden != inp else nn.Identity()
        self.dw = nn.Sequential(conv_bn(hidden, hidden, kernel, stride, groups=hidden), act())
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else nn.Identity()
        self.project = conv_bn(hidden, out)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        h = self.project(self.se(self.dw(self.expand(x))))
        return x + h if self.residual else h


class MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small layout (11 blocks), widths as given there."""

    # (kernel, hidden, out, se, activation, stride)
    SETTINGS = [
        (3, 16, 16, True, nn.ReLU, 2),
        (3, 72, 24, False, nn.ReLU, 2),
        (3, 88, 24, False, nn.ReLU, 1),
        (5, 96, 40, True, nn.Hardswish, 2),
        (5, 240, 40, True, nn.Hardswish, 1),
        (5, 240, 40, True, nn.Hardswish, 1),
        (5, 120, 48, True, nn.Hardswish, 1),
        (5, 144, 48, True, nn.Hardswish, 1),
        (5, 288, 96, True, nn.Hardswish, 2),
        (5, 576, 96, True, nn.Hardswish, 1),
        (5, 576, 96, True, nn.Hardswish, 1),
    ]

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.Hardswish())
        blocks, inp = [], 16
        for kernel, hidden, out, se, act, stride in self.SETTINGS:
            blocks.append(InvertedResidual(inp, hidden, out, kernel, stride, act, se))
            inp = out
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Sequential(conv_bn(inp, 576), nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, classes))

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def exported(net: nn.Module, size: int, seed: int) -> onnx.ModelProto:
    """`net` with random weights (seeded) and randomized BatchNorm, exported (TorchScript, opset 17)
    with a symbolic batch dimension. Kaiming-normal weights keep the signal alive through the
    blocks (with PyTorch's default init the MobileNetV3-style net's output hardly depends on its
    input: relative spread over inputs ~3e-7, so every reduction would look exact)."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.1)
    randomize_batchnorm(net, torch.Generator().manual_seed(seed + 1))
    return export(net, size)


def export(net: nn.Module, size: int) -> onnx.ModelProto:
    """`net` in eval mode, exported as is (TorchScript, opset 17) with a symbolic batch dimension."""
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        example = torch.randn(1, 3, size, size)
        return torch_models.export(net, example, False, Path(tmp) / "net.onnx", dynamic_batch=True)


# ---- reductions -------------------------------------------------------------------------------


def coupled_groups(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(single-producer layers, coupled groups) that `condense` may reduce, name -> width."""
    entries = cg.inspect(model, thresholds=(0.95,))["layers"]
    layers = {e["name"]: e["width"] for e in entries if not e["op"].endswith(" group")}
    groups = {e["name"]: e["width"] for e in entries if e["op"].endswith(" group")}
    return layers, groups


def reduce(model: onnx.ModelProto, calibration: dict, target: float, held: dict[str, int] | None) -> dict:
    """`condense` to `target` of the MACs; when that is out of reach (a CondenseError saying the
    smallest reachable fraction), again at the smallest reachable one, noted."""
    note = None
    start = time.perf_counter()
    try:
        result = cg.condense(
            model, target_macs=target, round_to=16, layer_widths=held, verify=True, calibration=calibration
        )
    except cg.CondenseError as error:
        match = re.search(r"smallest reachable is ([0-9.]+)", str(error))
        if match is None:
            raise
        retry = min(1.0, np.ceil(float(match.group(1)) * 100) / 100 + 0.01)
        note = f"target_macs={target} raised CondenseError: {error}; reduced at target_macs={retry:.2f}"
        print(f"  {note}", flush=True)
        target = retry
        result = cg.condense(
            model, target_macs=target, round_to=16, layer_widths=held, verify=True, calibration=calibration
        )
    return {"result": result, "target": target, "note": note, "seconds": time.perf_counter() - start}


def latencies(models: list[onnx.ModelProto], feeds: dict, threads: int, runs: int, repeats: int) -> dict:
    """Per model (after the first): median speedup over the repeats (each: interleaved runs, ratio
    of medians), its range, and the median run time of each model over all runs."""
    sessions = [make_session(m, threads) for m in models]
    times = [[] for _ in models]
    ratios = [[] for _ in models]
    for _ in range(repeats):
        block = interleaved_times(sessions, feeds, runs, warmup=max(3, runs // 10))
        medians = [np.median(t) for t in block]
        for i, t in enumerate(block):
            times[i] += t
            ratios[i].append(medians[0] / medians[i])
    return {
        "median_ms": [latency_summary(t)["median_ms"] for t in times],
        "speedup": [float(np.median(r)) for r in ratios],
        "range": [(min(r), max(r)) for r in ratios],
    }


# ---- the benchmark ----------------------------------------------------------------------------


def networks() -> list[tuple[str, nn.Module, int]]:
    return [
        ("ResNet-18-style 32-64-128-256", ResNet18((32, 64, 128, 256)), 32),
        ("MobileNetV3-small-style", MobileNetV3Small(), 96),
    ]


def bench_network(label: str, net: nn.Module, size: int, args) -> list[dict]:
    model = exported(net, size, seed=0)
    rng = np.random.default_rng(0)
    calibration = {"x": rng.standard_normal((args.rows, 3, size, size)).astype(np.float32)}
    layers, groups = coupled_groups(model)
    feeds = bench_feeds(model, 1, {})
    macs = count_macs(model, feeds)
    params = cg.count_params(model)
    print(
        f"{label}, 3x{size}x{size}: {params:,} params, {macs / 1e6:.1f}M MACs, {len(layers)} layers "
        f"({sum(layers.values())} channels), {len(groups)} coupled groups ({sum(groups.values())} channels)",
        flush=True,
    )
    variants = [("reduced", None), ("full width", dict(groups))]
    runs = []
    for name, held in variants:
        run = reduce(model, calibration, args.target, held)
        run["groups"] = name
        report = run["result"].report
        widths = {e["name"]: (e["width_before"], e["width_after"]) for e in report["layers"]}
        free = dict(layers) | ({} if held else groups)  # the units this run may reduce
        run["channels"] = (sum(widths.get(n, (w, w))[1] for n, w in free.items()), sum(free.values()))
        run["group_channels"] = (
            sum(widths.get(n, (w, w))[1] for n, w in groups.items()),
            sum(groups.values()),
        )
        run["macs"] = count_macs(run["result"].model, feeds) / macs
        run["params"] = report["params_after"] / report["params_before"]
        run["max_rel_err"] = report["verify"]["max_rel_err"]
        print(
            f"  groups {name}: target_macs {run['target']:.2f} -> MACs {run['macs']:.3f}, params "
            f"{run['params']:.3f}, reducible channels {run['channels'][0]}/{run['channels'][1]}, group "
            f"channels {run['group_channels'][0]}/{run['group_channels'][1]}, max_rel_err "
            f"{run['max_rel_err']:.3g} ({run['seconds']:.0f} s)",
            flush=True,
        )
        runs.append(run)
    models = [model] + [r["result"].model for r in runs]
    for threads in (1, 0):
        timing = latencies(models, feeds, threads, args.runs, args.repeats)
        for i, run in enumerate(runs, start=1):
            run[f"speedup{threads}"] = timing["speedup"][i]
            run[f"range{threads}"] = timing["range"][i]
            run[f"ms{threads}"] = (timing["median_ms"][0], timing["median_ms"][i])
        setting = "1 thread" if threads == 1 else "default threads"
        print(
            f"  {setting}: original {timing['median_ms'][0]:.3f} ms, "
            + ", ".join(
                f"groups {r['groups']} {timing['median_ms'][i]:.3f} ms ({timing['speedup'][i]:.2f}x)"
                for i, r in enumerate(runs, start=1)
            ),
            flush=True,
        )
    for run in runs:
        run |= {"net": f"{label}, 3x{size}x{size}", "macs_before": macs, "params_before": params}
    return runs


def table(rows: list[dict]) -> str:
    lines = [
        "| net | coupled groups | target_macs | MACs after | params after | reducible channels after / "
        "before | group channels after / before | max_rel_err | speedup 1 thread (range) | median ms "
        "1 thread before / after | speedup default threads (range) | reduce time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} ({r['params_before'] / 1e6:.2f}M params, {r['macs_before'] / 1e6:.0f}M MACs) "
            f"| {r['groups']} | {r['target']:.2f} | {r['macs']:.3f} | {r['params']:.3f} "
            f"| {r['channels'][0]:,} / {r['channels'][1]:,} | {r['group_channels'][0]:,} / "
            f"{r['group_channels'][1]:,} | {r['max_rel_err']:.3g} | {r['speedup1']:.2f}x "
            f"({r['range1'][0]:.2f}-{r['range1'][1]:.2f}) | {r['ms1'][0]:.3f} / {r['ms1'][1]:.3f} "
            f"| {r['speedup0']:.2f}x ({r['range0'][0]:.2f}-{r['range0'][1]:.2f}) | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def append_section(rows: list[dict], args, elapsed: float) -> None:
    """Append the section to RESULTS.md, or replace it when a run wrote it before (only it)."""
    notes = [f"- {r['net']}, groups {r['groups']}: {r['note']}" for r in rows if r["note"]]
    for net in dict.fromkeys(r["net"] for r in rows):
        pair = [r for r in rows if r["net"] == net]
        notes.append(
            f"- {net}: "
            + "; ".join(
                f"groups {r['groups']}: {r['macs']:.3f} of the MACs (ideal {1 / r['macs']:.2f}x), measured "
                f"{r['speedup1']:.2f}x on 1 thread ({r['speedup1'] * r['macs']:.2f} of ideal), max_rel_err "
                f"{r['max_rel_err']:.3g}"
                for r in pair
            )
            + "."
        )
    body = "\n".join(
        [
            "Shared 2-core CPU, noisy: read ratios and medians.",
            "",
            "Rerun: `PYTHONPATH=. python benchmarks/bench_groups.py` (`--quick`: fewer calibration rows "
            f"and runs). This run: {args.rows} calibration rows (standard normal; the last 20% verify), "
            f"batch 1, {args.repeats} repeats x {args.runs} interleaved runs per thread setting, "
            f"{elapsed:.0f} s in all.",
            "",
            "Each net (random weights, randomized BatchNorm, TorchScript export, opset 17) is reduced with "
            f"`condense(target_macs={args.target}, round_to=16, calibration=..., verify=True)` twice: "
            "coupled groups reduced (the default), and every coupled group held at its full width "
            "(`layer_widths={group: width}`, the groups from `inspect`). MACs and params are fractions of "
            "the original; reducible channels = summed widths of the layers and groups the run may "
            "reduce (with groups held: the single-producer layers only); speedup = median(original) / "
            "median(reduced), the median over the repeats (range: the repeats' min-max).",
            "",
            table(rows),
            "",
            "Remarks:",
            "",
            *notes,
            "- Random weights have no condensation: no merge is exact and max_rel_err is what the refit "
            "leaves on random inputs. This measures speed, not accuracy.",
            "- `target_macs` allocates the single-producer layers by their OBS costs; the coupled groups "
            "get the width the data-free uniform search gives for the same fraction (these numbers were "
            "measured when the paper's rule still selected a group's channels; OBS selects them now, "
            "at the same widths), so the two rows of a net reach the MAC target "
            "with different layer widths. Holding the groups, the allocation can only cut the "
            "single-producer layers (a ResNet's first conv of each block, MobileNetV3's SE squeeze and "
            "head), so it cuts those deeper to reach the same MACs, or cannot reach them.",
            "- Default threads (ONNX Runtime's pool, 2 threads here) on a 2-core machine shared with "
            "other jobs: a busy core stalls the pool, so these ratios swing widely (see the ranges); "
            "read the 1-thread column.",
        ]
    )
    write_section("groups", SECTION.removeprefix("## "), body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 calibration rows, fewer timing runs")
    parser.add_argument("--target", type=float, default=0.5, help="target_macs (default 0.5)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    args.rows, args.runs, args.repeats = (32, 30, 3) if args.quick else (64, 60, 5)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    for label, net, size in networks():
        rows += bench_network(label, net, size, args)
    elapsed = time.perf_counter() - start
    print()
    print(table(rows))
    if not args.no_write:
        append_section(rows, args, elapsed)
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
