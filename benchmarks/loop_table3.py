"""Table 3's protocol (section 3.2) with the automatic loop: the paper's MobileNetV2, reduced by
`condense_graph.torch.auto_reduce`, against a Torch-Pruning magnitude control of issue 14.

Network: benchmarks/torch_models.py `MobileNetV2` (torchvision's definition, first conv stride 1
for 32x32 inputs, 10 classes: 2,236,682 parameters, checked), eq. (20) initialization
N(0, ((m_in + m_out)/2)^-2) of every Conv and Linear weight (m_in = fan-in, m_out = fan-out),
zero Linear bias; BatchNorm at PyTorch's defaults.

Data: by default NOT CIFAR-10 (no download here): scikit-learn's digits (`load_digits`, 1,797
8x8 grayscale images, 10 classes) upsampled bilinearly to 32x32 and repeated to 3 channels,
standardized with the training set's mean and std; a seeded split of 300 test, 300 validation,
1,197 training images. `--data PATH` loads CIFAR-10 from disk instead: the python-pickle batches
directory `cifar-10-batches-py` (data_batch_1..5 for training, test_batch for test), or an .npz
with x (N,32,32,3 uint8 or N,3,32,32) and y (optionally x_test, y_test; otherwise 1/6 of it is
held out for test); per-channel standardization, `--val-size` (1000) training images held out
for validation. No augmentation.

Training schedule (the paper's section 3.2.2, batch and steps scaled for 2 CPU cores): SGD
(momentum 0.9, no weight decay) at lr `--lr` (0.01) annealed by a cosine to 0 every 200 steps
(warm restarts) for the first 400 steps of an optimizer, batch `--batch` (32; the paper 128).
The pre-training switches to Adam (betas 0.9/0.999, eps 1e-8, no weight decay) at lr 1e-3,
alternating with 1e-4 every 1000 steps, after 400 steps (the paper's mixed strategy; the default
`--train-steps` 400 stays in the SGD phase). Inside the loop every reduction makes a fresh SGD
optimizer at eq. (21)'s learning rate (lr_max = `--lr`, lr_min = 1e-4, T_lr = 200) and the
cosine restarts with it (retraining after a reduction is far shorter than 400 steps, so the
loop stays in the SGD phase, as the paper's does).

Protocol:
1. train the network `--train-steps` (400) steps; its accuracy b on the fixed validation set is
   the baseline;
2. `auto_reduce` with accuracy criteria (higher_is_better) at the paper's offsets from its
   starting accuracy 0.88: main b -> b - 0.03, layer b - 0.04 -> b - 0.07 (eq. 22, T_Acc 100),
   last layer b - 0.08, deviation 0.5 after 10 steps, final b - 0.03 (`--paper-levels`: the
   paper's absolute 0.88/0.85, 0.84/0.81, 0.8, 0.5, CIFAR-10 levels); target
   `Widths(--width-fraction)` (0.7 of every layer's current width per main reduction, backed off
   halfway after a failure; `--target threshold`: the paper's `Thresholds`, eq. 23-25, 0.8808 at
   first, which merges nothing on a network trained this briefly: the script prints and records
   how many channels 0.8808 merges), the paper's step limits 20 (+10 per failure), `max_main` (2)
   main reductions, the last layer's limit cut to `--last-layer-steps` (60; the paper 200),
   at most `--max-attempts` (3) reductions of a layer per main reduction, `--main-steps` (100) to
   reach the main criterion, evaluation every `--eval-every` (5) steps, a final reduction of the
   classifier's input layer (features.18, 320 -> 1280, 1x1 conv) at threshold
   `--final-threshold` (the paper's 0.4), a final phase of up to `--final-steps` (100) steps with
   early stopping (patience 5 evaluations), the loop capped at `--max-steps` (1000);
3. control: Torch-Pruning 1.6 (DependencyGraph, MagnitudeImportance(p=2)) prunes the trained
   network of step 1 to the loop's final width of every reducible layer (the same groups: an
   expand conv with its depthwise conv and BatchNorms, a residual chain of projection convs),
   then fine-tunes it the loop's number of steps (rolled-back steps included) with one SGD
   optimizer at `--lr` and the same cosine; the unreduced network trained the same extra steps
   is the reference row (`--no-unreduced` leaves it out).
The table (params, ratio, val / test accuracy, steps, wall time) goes to stdout and, unless
`--no-write`, to benchmarks/RESULTS.md (section `loop_table3`; `--data` writes
`loop_table3_cifar10`, `--full` adds `_full`); the loop's Figure 6 to benchmarks/loop_table3.png
(the same suffixes), its JSON log to `--log`.

    pip install torch torch-pruning scikit-learn matplotlib
    PYTHONPATH=.:benchmarks python benchmarks/loop_table3.py            # ~15 min on 2 CPU cores
    PYTHONPATH=.:benchmarks python benchmarks/loop_table3.py --quick    # smoke run, ~3 min
    PYTHONPATH=.:benchmarks python benchmarks/loop_table3.py --full --data ~/cifar-10-batches-py  # GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from loop_table1 import (
    PAPER_THRESHOLD,
    OptimizerSchedule,
    add_target_arguments,
    count,
    target_of,
    target_text,
    widths_at,
)
from results import write_section
from torch import nn
from torch_models import MobileNetV2, digits_data

from condense_graph.auto_reduce import TorchReducer
from condense_graph.plots import plot_loop
from condense_graph.torch import Cosine, Criteria, LoopConfig, auto_reduce

HERE = Path(__file__).resolve().parent
PAPER_PARAMS = 2_236_682
FINAL_LAYER = "features.18.0.weight"  # the 1x1 conv to 1280 channels feeding the classifier
SGD_STEPS = 400  # the paper's SGD phase, then Adam


# ----------------------------------------------------------------------------- data


def chw(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:  # the pickle batches' rows: 3072 = 3 x 32 x 32
        x = x.reshape(-1, 3, 32, 32)
    elif x.shape[-1] == 3:
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1:] != (3, 32, 32):
        raise ValueError(f"images of shape (N,32,32,3) or (N,3,32,32) expected, got {x.shape}")
    return x


def cifar_data(path: Path, val_size: int, seed: int) -> tuple[dict, str]:
    path = path.expanduser()
    if path.is_dir():
        batches = []
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(path / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            batches.append((chw(batch[b"data"]), np.asarray(batch[b"labels"])))
        x_all = np.concatenate([b[0] for b in batches[:5]])
        y_all = np.concatenate([b[1] for b in batches[:5]])
        x_test, y_test = batches[5]
    else:
        with np.load(path) as data:
            x_all, y_all = chw(data["x"]), np.asarray(data["y"]).reshape(-1)
            if "x_test" in data:
                x_test, y_test = chw(data["x_test"]), np.asarray(data["y_test"]).reshape(-1)
            else:
                perm = np.random.default_rng(seed + 7).permutation(len(x_all))
                cut = len(x_all) // 6
                x_test, y_test = x_all[perm[:cut]], y_all[perm[:cut]]
                x_all, y_all = x_all[perm[cut:]], y_all[perm[cut:]]
    if not 0 < val_size < len(x_all) // 2:
        raise SystemExit(
            f"--val-size {val_size}: {path} has {len(x_all):,} training images; "
            f"hold out fewer than half of them"
        )
    perm = np.random.default_rng(seed).permutation(len(x_all))
    val, train = perm[:val_size], perm[val_size:]
    scale = 255.0 if x_all.dtype == np.uint8 else 1.0
    x_all, x_test = x_all.astype(np.float32) / scale, x_test.astype(np.float32) / scale
    mean = x_all[train].mean(axis=(0, 2, 3), keepdims=True)
    std = x_all[train].std(axis=(0, 2, 3), keepdims=True)
    x_all, x_test = (x_all - mean) / std, (x_test - mean) / std
    data = {
        "train": (x_all[train], y_all[train]),
        "val": (x_all[val], y_all[val]),
        "test": (x_test, y_test),
    }
    source = f"CIFAR-10 from {path} ({len(train):,} train, {len(val):,} validation, {len(x_test):,} test)"
    return {
        k: (np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)) for k, (x, y) in data.items()
    }, (source)


# ----------------------------------------------------------------------------- model and schedule


def paper_init(module: nn.Module, seed: int) -> nn.Module:
    """Eq. (20): N(0, ((m_in + m_out)/2)^-2) for every Conv / Linear weight, zero Linear bias."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            receptive = m.weight[0, 0].numel()
            m_in = m.weight.shape[1] * receptive
            m_out = m.weight.shape[0] * receptive // (m.groups if isinstance(m, nn.Conv2d) else 1)
            with torch.no_grad():
                m.weight.normal_(0.0, 2.0 / (m_in + m_out), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def sgd(parameters, lr: float):
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=0.0)


class Schedule(OptimizerSchedule):
    """One training step (`train_step(module, optimizer)`): a random batch, cross entropy, and the
    paper's learning rate per optimizer, counted from that optimizer's first step: SGD's cosine
    from its initial lr to 0 every 200 steps; Adam's 1e-3 / 1e-4 alternating every 1000 steps."""

    def __init__(self, data, batch: int, seed: int, device):
        super().__init__(data, seed, device)
        self.batch = batch

    def lr(self, optimizer, k: int) -> float:
        if isinstance(optimizer, torch.optim.Adam):
            return 1e-3 if (k // 1000) % 2 == 0 else 1e-4
        return self.base[id(optimizer)] * 0.5 * (1.0 + math.cos(math.pi * (k % 200) / 200))

    def batch_size(self, k: int) -> int:
        return self.batch

    def loss(self, output, target):
        return nn.functional.cross_entropy(output, target)


def evaluator(x: np.ndarray, y: np.ndarray, device, chunk: int = 500):
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    @torch.no_grad()
    def evaluate(module) -> float:
        was = module.training
        module.eval()
        correct = sum(
            int((module(xt[i : i + chunk]).argmax(1) == yt[i : i + chunk]).sum())
            for i in range(0, len(xt), chunk)
        )
        module.train(was)
        return correct / len(xt)

    return evaluate


def pretrain(module, schedule: Schedule, steps: int, lr: float) -> None:
    """The paper's mixed strategy: SGD with the cosine for 400 steps, then Adam."""
    module.train()
    optimizer = sgd(module.parameters(), lr)
    for step in range(steps):
        if step == SGD_STEPS:
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        schedule(module, optimizer)
    module.eval()


def finetune(module, schedule: Schedule, steps: int, lr: float) -> None:
    """A control's training: one SGD optimizer at lr, the cosine restarting every 200 steps."""
    module.train()
    optimizer = sgd(module.parameters(), lr)
    for _ in range(steps):
        schedule(module, optimizer)
    module.eval()


# ----------------------------------------------------------------------------- the control


def parameter_differences(ours: nn.Module, theirs: nn.Module) -> tuple[dict[str, int], list[str]]:
    """How two modules of one architecture differ in their parameters: those only `ours` has
    (name -> element count), and 'name: shape / shape' lines for every other difference."""
    a = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    b = {name: tuple(p.shape) for name, p in theirs.named_parameters()}
    only_ours = {name: int(np.prod(shape)) for name, shape in a.items() if name not in b}
    other = [
        f"{name}: {a.get(name, '-')} / {b.get(name, '-')}"
        for name in sorted(a | b)
        if name not in only_ours and a.get(name) != b.get(name)
    ]
    return only_ours, other


def torch_pruning_to(module: nn.Module, widths: dict[str, int], example) -> nn.Module:
    """Torch-Pruning's DependencyGraph + MagnitudeImportance(p=2): each reducible layer (named by
    its weight, as the loop names it) pruned to `widths[layer]` output channels, coupled layers
    (depthwise convs, BatchNorms, residual chains, the next layer's inputs) with it."""
    net = copy.deepcopy(module).eval()
    modules = dict(net.named_modules())
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
    importance = tp.importance.MagnitudeImportance(p=2)
    for layer_name, width in widths.items():
        layer = modules[layer_name.removesuffix(".weight")]
        conv = isinstance(layer, nn.Conv2d)
        prune = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        n = layer.out_channels if conv else layer.out_features
        if width >= n:
            continue
        group = graph.get_pruning_group(layer, prune, idxs=list(range(n)))
        scores = importance(group).detach().cpu().numpy()
        drop = np.argsort(scores, kind="stable")[: n - width].tolist()
        graph.get_pruning_group(layer, prune, idxs=drop).prune()
    return net


# ----------------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="CIFAR-10: cifar-10-batches-py directory or an .npz")
    p.add_argument("--full", action="store_true", help="the paper's settings (for a GPU, with --data)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 100 steps, 1 main reduction")
    p.add_argument("--train-steps", type=int, default=400, help="steps before the loop")
    p.add_argument("--lr", type=float, default=0.01, help="SGD's lr, eq. (21)'s lr_max")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--val-size", type=int, default=1000, help="validation images held out (CIFAR-10)")
    p.add_argument("--test-size", type=int, default=0, help="test images used (0: all)")
    p.add_argument("--paper-levels", action="store_true", help="the paper's absolute CIFAR-10 levels")
    p.add_argument("--max-main", type=int, default=2)
    add_target_arguments(p, width_fraction=0.7)
    p.add_argument("--main-steps", type=int, default=100)
    p.add_argument("--last-layer-steps", type=int, default=60)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--final-threshold", type=float, default=0.4, help="0: no final reduction")
    p.add_argument("--final-steps", type=int, default=100)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=1000, help="the loop's step budget")
    p.add_argument("--no-unreduced", action="store_true", help="leave out the unreduced reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log", type=Path, default=Path("/tmp/loop_table3.json"))
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / the PNG")
    args = p.parse_args()
    if args.full:
        args.batch, args.max_main, args.main_steps, args.last_layer_steps = 128, 6, 1000, 200
        args.max_attempts, args.eval_every, args.final_steps, args.patience = 10, 1, 1000, 50
        args.max_steps = 20000
    if args.quick:
        args.train_steps, args.max_main, args.eval_every, args.final_steps = 100, 1, 5, 20
        args.last_layer_steps, args.max_attempts, args.max_steps, args.patience = 20, 1, 250, 2
    return args


def criteria_for(baseline: float, paper: bool) -> Criteria:
    if paper:
        return Criteria()
    b = baseline
    return Criteria(
        main=Cosine(b, b - 0.03, 100),
        layer=Cosine(b - 0.04, b - 0.07, 100),
        last_layer=b - 0.08,
        deviation=0.5,
        final=b - 0.03,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.full and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    if args.data is None:
        data, source = digits_data(args.seed)
    else:
        data, source = cifar_data(args.data, args.val_size, args.seed)
    if args.test_size:
        data["test"] = tuple(a[: args.test_size] for a in data["test"])
    print(f"data: {source} ({time.perf_counter() - start:.0f} s)", flush=True)
    val_acc = evaluator(*data["val"], device)
    test_acc = evaluator(*data["test"], device)
    example = torch.zeros(1, 3, 32, 32)

    def schedule(offset: int):
        return Schedule(data, args.batch, args.seed + offset, device)

    net = paper_init(MobileNetV2(num_classes=10), args.seed).to(device)
    original = count(net)
    print(f"MobileNetV2: {original:,} parameters (the paper's {PAPER_PARAMS:,})", flush=True)
    if original != PAPER_PARAMS:
        raise SystemExit(f"MobileNetV2 has {original:,} parameters, not the paper's {PAPER_PARAMS:,}")

    # 1. the trained network
    t0 = time.perf_counter()
    pretrain(net, schedule(0), args.train_steps, args.lr)
    train_s = time.perf_counter() - t0
    baseline = val_acc(net)
    print(
        f"trained {args.train_steps} steps (batch {args.batch}) in {train_s:.0f} s: val accuracy "
        f"{baseline:.4f}, test accuracy {test_acc(net):.4f}",
        flush=True,
    )

    paper_cut = widths_at(net, example, PAPER_THRESHOLD)
    merged_at_paper = sum(w - at for w, at in paper_cut.values())
    print(
        f"eq. (23)'s threshold {PAPER_THRESHOLD} merges {merged_at_paper} of "
        f"{sum(w for w, _ in paper_cut.values())} channels of the trained network",
        flush=True,
    )

    # 2. the loop
    criteria = criteria_for(baseline, args.paper_levels)
    config = LoopConfig(
        lr=Cosine(args.lr, 1e-4, 200, hold=False),
        last_layer_steps=args.last_layer_steps,
        eval_every=args.eval_every,
        main_steps=args.main_steps,
        max_main=args.max_main,
        max_attempts=args.max_attempts,
        max_steps=args.max_steps,
        final_threshold=args.final_threshold or None,
        final_layer=FINAL_LAYER,
        final_steps=args.final_steps,
        patience=args.patience,
    )
    t0 = time.perf_counter()
    result = auto_reduce(
        net,
        schedule(1),
        val_acc,
        criteria,
        example_inputs=example.to(device),
        target=target_of(args),
        config=config,
        optimizer=sgd,
        log_path=args.log,
    )
    loop_s = time.perf_counter() - t0
    events = result.log
    kept = sum(e["event"] == "accept" for e in events)
    rollbacks = sum(e["event"] == "rollback" for e in events)
    reducer = TorchReducer(example)
    widths_before = reducer.layers(copy.deepcopy(net).cpu().eval())
    widths_after = reducer.layers(copy.deepcopy(result.module).cpu().eval())
    print(
        f"loop: {result.steps} steps in {loop_s:.0f} s, params {result.params:,} "
        f"({result.params_ratio:.3f}), "
        f"val accuracy {result.metric:.4f}, final met {result.final_met}, stop: {result.stop_reason}; "
        f"{kept} reductions kept, {rollbacks} rollbacks",
        flush=True,
    )

    # 3. the control: Torch-Pruning to the loop's widths, fine-tuned the loop's steps
    t0 = time.perf_counter()
    pruned = torch_pruning_to(net.cpu(), widths_after, example).to(device)
    prune_s = time.perf_counter() - t0
    net.to(device)
    widths_pruned = reducer.layers(copy.deepcopy(pruned).cpu().eval())
    matched = widths_pruned == widths_after
    pruned_val0 = val_acc(pruned)
    added, differ = parameter_differences(result.module, pruned)
    t0 = time.perf_counter()
    finetune(pruned, schedule(2), result.steps, args.lr)
    control_s = prune_s + time.perf_counter() - t0
    print(
        f"Torch-Pruning: {count(pruned):,} params, widths "
        f"{'match' if matched else 'DIFFER from'} the loop's, "
        f"val accuracy {pruned_val0:.4f} before / {val_acc(pruned):.4f} after {result.steps} steps "
        f"({control_s:.0f} s)",
        flush=True,
    )
    rows = [
        ("trained (start of the loop)", count(net), args.train_steps, val_acc(net), test_acc(net), train_s),
        ("loop (auto_reduce)", result.params, args.train_steps + result.steps, val_acc(result.module),
         test_acc(result.module), train_s + loop_s),
        ("Torch-Pruning L2 magnitude + fine-tune", count(pruned), args.train_steps + result.steps,
         val_acc(pruned), test_acc(pruned), train_s + control_s),
    ]  # fmt: skip
    if not args.no_unreduced:
        t0 = time.perf_counter()
        unreduced = copy.deepcopy(net)
        finetune(unreduced, schedule(3), result.steps, args.lr)
        unreduced_s = train_s + time.perf_counter() - t0
        rows.append(
            ("unreduced, same extra steps", count(unreduced), args.train_steps + result.steps,
             val_acc(unreduced), test_acc(unreduced), unreduced_s)
        )  # fmt: skip

    header = "| model | params | ratio | steps | val accuracy | test accuracy | wall time |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, params, steps, v, t, s in rows:
        lines.append(
            f"| {name} | {params:,} | {params / original:.2%} | {steps:,} | {v:.2%} | {t:.2%} | {s:.0f} s |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    difference = (
        f"The loop's network has {result.params - count(pruned):+,} parameters against Torch-Pruning's "
        f"at the same widths: {len(added)} bias vectors ({sum(added.values()):,} parameters) that "
        f"bias-free convolutions of the original gained in the reduction (a merge folds what a removed "
        f"channel contributed as a constant, e.g. its BatchNorm shift through ReLU6, into a bias: "
        f"`merge.ChannelMap.offset`; a conv without one gets a new one), other differences: "
        f"{'; '.join(differ) or 'none'}. Added: {', '.join(sorted(added)[:8]) or 'none'}"
        f"{f' and {len(added) - 8} more' if len(added) > 8 else ''}."
    )
    print(difference, flush=True)
    width_lines = ["| layer (weight) | trained | loop | Torch-Pruning |", "|---|---:|---:|---:|"]
    for name, width in widths_before.items():
        width_lines.append(
            f"| {name} | {width} | {widths_after.get(name, '-')} | {widths_pruned.get(name, '-')} |"
        )
    width_table = "\n".join(width_lines)
    trained_test, loop_test, control_test = rows[0][4], rows[1][4], rows[2][4]
    closing = (
        f"The loop kept {result.params_ratio:.1%} of the parameters ({result.params:,} of {original:,}) "
        f"at a test accuracy of {loop_test:.2%} (trained network {trained_test:.2%}) in {result.steps:,} "
        f"steps and {loop_s:.0f} s ({kept} reductions kept, {rollbacks} rollbacks, stop: "
        f"{result.stop_reason}; final criterion {'met' if result.final_met else 'NOT met'}); "
        f"Torch-Pruning's magnitude pruning to the same widths ({count(pruned):,} params) reached "
        f"{control_test:.2%} after the same {result.steps:,} steps of fine-tuning ({control_s:.0f} s)."
    )
    if args.data is None:
        closing += " These are digits numbers, not CIFAR-10's."
    print(closing, flush=True)
    if args.no_write:
        print(json.dumps({"total_s": round(time.perf_counter() - start)}))
        return
    suffix = ("_cifar10" if args.data is not None else "") + ("_full" if args.full else "")
    png = plot_loop(events, HERE / f"loop_table3{suffix}.png", "validation accuracy")
    reductions = [e for e in events if e["event"] in ("accept", "rollback")]
    history = "\n".join(
        f"- step {e['step']}: {e['event']} {e['layer']} -> params {e['params']:,} "
        f"({e['params_ratio']:.3f}), val accuracy {e['metric']:.4f} (level {e['level']:.4f})"
        for e in reductions
    )
    levels = (
        "the paper's `Criteria()` (main 0.88 -> 0.85, layer 0.84 -> 0.81, last layer 0.8, deviation 0.5)"
        if args.paper_levels
        else f"the paper's offsets from b = {baseline:.4f} (main b -> b - 0.03, layer b - 0.04 -> b - 0.07, "
        "last layer b - 0.08, deviation 0.5, final b - 0.03)"
    )
    device_text = f"{device.type}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    flags = "".join(f" {flag}" for flag, on in (("--full", args.full), ("--quick", args.quick)) if on) + (
        "" if args.data is None else f" --data {args.data}"
    )
    data_note = (
        "**These numbers are on scikit-learn's digits, not CIFAR-10** (no CIFAR-10 on this machine; "
        "`--data` runs the same protocol on it)."
        if args.data is None
        else "Data: CIFAR-10."
    )
    body = f"""Rerun: `PYTHONPATH=.:benchmarks python benchmarks/loop_table3.py{flags}` (the docstring has
every setting).

{data_note}

Table 3's protocol (section 3.2) with the automatic loop (`condense_graph.torch.auto_reduce`):
the paper's MobileNetV2 ({original:,} parameters), eq. (20) initialization, on {device_text},
{args.threads} torch threads. Data: {source}. Training: SGD (momentum 0.9) at lr {args.lr:g}, cosine
to 0 every 200 steps, batch {args.batch} (the paper 128), {args.train_steps} steps before the loop
(Adam after 400 steps, the paper's mixed strategy). Loop: accuracy criteria at {levels};
target {target_text(args)}, `LoopConfig(lr=Cosine({args.lr:g}, 0.0001, 200, hold=False),
last_layer_steps={args.last_layer_steps}, eval_every={args.eval_every}, main_steps={args.main_steps},
max_main={args.max_main}, max_attempts={args.max_attempts}, max_steps={args.max_steps},
final_threshold={args.final_threshold or None}, final_layer="{FINAL_LAYER}",
final_steps={args.final_steps}, patience={args.patience})`, a new SGD optimizer after each
reduction; the paper's layer step limits (20, +10 per failure) otherwise. Control: Torch-Pruning
{tp.__version__} `MagnitudeImportance(p=2)` on the trained network, every reducible layer to the
loop's final width ({"matched exactly" if matched else "NOT matched exactly: see the widths"}; val
accuracy {pruned_val0:.2%} right after pruning), fine-tuned the loop's {result.steps} steps (rolled-back
steps included) with one SGD optimizer at lr {args.lr:g} and the same cosine. Val = the loop's
criterion data, test = held out. Steps and wall time include the {args.train_steps} steps
({train_s:.0f} s) of pre-training.

{table}

{closing}

The paper's cosine rule at eq. (23)'s threshold {PAPER_THRESHOLD} on the trained network (`inspect`,
before the loop) merges {merged_at_paper} of its {sum(w for w, _ in paper_cut.values())} reducible
channels.

{difference}

Widths of the reducible layers:

{width_table}

Reductions kept / rolled back:

{history}

![Figure 6: validation accuracy and parameter ratio against step](loop_table3{suffix}.png)
"""
    title = f"Table 3 protocol, automatic loop (MobileNetV2, {'CIFAR-10' if args.data else 'digits'})"
    write_section(f"loop_table3{suffix}", title, body)
    print(f"wrote {png} and RESULTS.md section loop_table3{suffix}; log {args.log}")
    print(json.dumps({"total_s": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
