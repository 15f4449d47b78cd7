"""Reducible channels before and after coupled channel groups (issue 13), and what reducing them
at half the parameters costs, on look-alikes of deployed nets built in code.

Four nets with random weights and randomized BatchNorm statistics: ResNet-18-style (half widths) and
MobileNetV3-small-style (`bench_groups`), MobileNetV2 (`torch_models`, the paper's Table 2 net)
and a YOLOv8n-style backbone written here (C2f blocks: a 1x1 conv split in two, bottlenecks with
residual Adds, everything concatenated into a 1x1 conv; SiLU). Each is reduced with
`target_params=0.5` and 32 standard-normal calibration rows (the default rule: structured OBS,
layers and groups allocated together on their OBS cost curves, then the refit), twice: groups
free, and groups held at their full width. "Reducible channels" counts the channels of
single-producer layers (before this issue) and those plus the channels of mergeable coupled
groups (after).

Random weights have no condensation: errors are large for both; the comparison is at one size.
`--trained STEPS` trains each net first (Adam, lr 1e-3 on a cosine, batch 64, one thread) on
scikit-learn's digits upsampled to the net's input size (not a real image task, but trained
weights with BatchNorm statistics of real data), calibrates on 64 training images, and adds the
test accuracy and the logits' relative RMS error (300 held-out digits, ONNX Runtime) of the
original and of both reductions, with no retraining.

    PYTHONPATH=.:benchmarks python benchmarks/group_reductions.py [--trained 300]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_groups import MobileNetV3Small, ResNet18, export, exported
from torch import nn
from torch_models import MobileNetV2, digits_data

import condense_graph as cg


def conv_bn_silu(inp: int, out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out), nn.SiLU()
    )


class Bottleneck(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.cv1, self.cv2 = conv_bn_silu(channels, channels, 3), conv_bn_silu(channels, channels, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: cv1 -> split in two halves; bottlenecks on the second; concat of all -> cv2."""

    def __init__(self, inp: int, out: int, blocks: int = 1):
        super().__init__()
        self.hidden = out // 2
        self.cv1 = conv_bn_silu(inp, 2 * self.hidden)
        self.m = nn.ModuleList(Bottleneck(self.hidden) for _ in range(blocks))
        self.cv2 = conv_bn_silu((2 + blocks) * self.hidden, out)

    def forward(self, x):
        parts = list(self.cv1(x).split(self.hidden, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class YoloV8nBackbone(nn.Module):
    """YOLOv8n's backbone layout (stem, strided convs, C2f blocks) with a pooled classifier head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_silu(3, 16, 3, 2),
            conv_bn_silu(16, 32, 3, 2),
            C2f(32, 32, 1),
            conv_bn_silu(32, 64, 3, 2),
            C2f(64, 64, 2),
            conv_bn_silu(64, 128, 3, 2),
            C2f(128, 128, 2),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


NETS = {  # (builder, input side): sizes that run in minutes on a shared 2-core CPU
    "resnet18-style": (lambda: ResNet18(widths=(32, 64, 128, 256)), 32),
    "MobileNetV2": (MobileNetV2, 32),
    "MobileNetV3-small-style": (MobileNetV3Small, 64),
    "YOLOv8n-style": (YoloV8nBackbone, 64),
}


def calibration(model: onnx.ModelProto, size: int, rows: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {model.graph.input[0].name: rng.standard_normal((rows, 3, size, size)).astype(np.float32)}


def trained(net: nn.Module, size: int, steps: int, data: dict, seed: int = 0) -> onnx.ModelProto:
    """`net` trained `steps` Adam steps (batch 64, lr 1e-3 on a cosine to 0, so the last steps
    settle the weights and BatchNorm statistics) on the digits' training split, exported. One
    thread: multi-threaded CPU backward passes are not bit-reproducible, and a run that differs
    in the last bits can end in another state (a loss spike seen at step 300)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = (torch.from_numpy(a) for a in data["train"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    net.train()
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = torch.randint(len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    torch.set_num_threads(threads)
    return export(net, size)


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0].astype(np.float64)


def scores(model: onnx.ModelProto, test: tuple, original: np.ndarray | None = None) -> tuple:
    """Test accuracy, and the logits' relative RMS error ||y - y_original|| / ||y_original|| over
    the test images (300 rows: steadier than verify's max over the calibration hold-out), and
    the logits."""
    images, labels = test
    y = logits(model, images)
    error = None if original is None else float(np.linalg.norm(y - original) / np.linalg.norm(original))
    return {"accuracy": float((y.argmax(1) == labels).mean()), "test_rel_err": error}, y


def reducible(model: onnx.ModelProto) -> tuple[int, int, dict[str, int]]:
    info = cg.inspect(model, thresholds=(0.95,))
    summary = info["groups_summary"]
    groups = {e["name"]: e["width"] for e in info["layers"] if e["op"].endswith(" group")}
    return summary["layer_channels"], summary["layer_channels"] + summary["coupled_channels_ready"], groups


def reduce(model: onnx.ModelProto, data: dict, held: dict | None, test: tuple | None, original=None) -> dict:
    start = time.perf_counter()
    result = cg.condense(model, target_params=0.5, calibration=data, verify=True, layer_widths=held)
    report = result.report
    groups = [g for g in report["layers"] if "group" in g]
    return {
        "params": report["params_after"] / report["params_before"],
        "error": report["verify"]["max_rel_err"],
        "group_channels": (sum(g["width_before"] for g in groups), sum(g["width_after"] for g in groups)),
        "seconds": time.perf_counter() - start,
    } | (scores(result.model, test, original)[0] if test else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", type=int, default=0, metavar="STEPS", help="train on digits first")
    args = parser.parse_args()
    rows = []
    for name, (build, size) in NETS.items():
        test = None
        if args.trained:
            print(f"{name}: training {args.trained} steps on digits at {size}x{size}", flush=True)
            digits, _ = digits_data(seed=0, size=size)
            torch.manual_seed(0)  # the initial weights
            model = trained(build(), size, args.trained, digits)
            data = {model.graph.input[0].name: digits["train"][0][:64]}
            test = digits["test"]
        else:
            print(f"{name}: exporting", flush=True)
            model = exported(build(), size, seed=0)
            data = calibration(model, size)
        before, after, groups = reducible(model)
        base, base_logits = scores(model, test) if test else ({}, None)
        original = base.get("accuracy")
        free = reduce(model, data, None, test, base_logits)
        held = reduce(model, data, dict(groups), test, base_logits)
        rows.append((name, before, after, len(groups), free, held, original))
        print(f"  reducible channels {before} -> {after}; free {free}; held {held}", flush=True)
    print()
    accuracy_head = " test accuracy: original / free / held | test logits rel. RMS error: free / held |"
    accuracy_head = accuracy_head if args.trained else ""
    print(
        "| net | reducible channels before -> after | coupled groups | group channels (free) "
        f"| params kept: groups free / held | held-out max_rel_err: groups free / held |{accuracy_head}"
        " seconds |"
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.trained else ""))
    for name, before, after, count, free, held, original in rows:
        accuracies = (
            f" {original:.1%} / {free['accuracy']:.1%} / {held['accuracy']:.1%} |"
            f" {free['test_rel_err']:.3g} / {held['test_rel_err']:.3g} |"
            if args.trained
            else ""
        )
        print(
            f"| {name} | {before} -> {after} | {count} | {free['group_channels'][0]} -> "
            f"{free['group_channels'][1]} | {free['params']:.3f} / {held['params']:.3f} | "
            f"{free['error']:.3g} / {held['error']:.3g} |{accuracies} "
            f"{free['seconds']:.0f} / {held['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
