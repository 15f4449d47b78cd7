"""Latency of ONNX Runtime sessions, measured the way a careful engineer would.

Warm-up runs first, then interleaved runs (A, B, B, A, A, B...: the order alternates each round, so
drift of a shared, noisy machine hits both models alike). Reported per model: median and
interquartile range of the run times, params, multiply-accumulates from inferred shapes, file size;
and the speedup of each model over the first one (ratio of medians).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx
import onnxruntime as ort

from condense_graph import runtime
from condense_graph.progress import Progress, silent
from condense_graph.report import count_params
from condense_graph.verify import random_feeds

logger = logging.getLogger(__name__)


def count_macs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], warnings: list | None = None) -> int:
    """Multiply-accumulates of Gemm, MatMul, Conv and ConvTranspose for inputs shaped like `feeds`
    (0 when onnx cannot infer the shapes: logged and added to `warnings`)."""
    shapes = inferred_shapes(model, {name: list(v.shape) for name, v in feeds.items()}, warnings)
    total = 0
    for node in model.graph.node:
        total += _node_macs(node, shapes)
    return total


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0]) if node.output else None
    data = shapes.get(node.input[0]) if node.input else None
    weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if out is None or data is None or weight is None:
        return 0
    if node.op_type in ("Gemm", "MatMul"):
        return int(np.prod(out)) * int(data[-1] if not _attr(node, "transA") else data[0])
    if node.op_type == "Conv":  # weight [Cout, Cin/group, k, k]: each output sums Cin/group*k*k
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(data)) * int(np.prod(weight[1:]))  # each input pixel feeds Cout/g * k*k
    return 0


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def inferred_shapes(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]], warnings: list | None = None
) -> dict[str, list[int]]:
    """Static shapes of every tensor onnx can infer once the inputs have concrete shapes (none when
    inference fails: logged and added to `warnings`)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            # strict=False: an input declared without a shape has no dims to set (inference fills them)
            for dim, size in zip(dims, input_shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = size
    fixed, error = runtime.infer_shapes(fixed, data_prop=True)
    if error is not None:  # a model onnx cannot infer still runs; its MACs become 0
        runtime.degraded(logger, warnings, f"shape inference failed ({error}): MACs counted as 0")
        return {}
    shapes = {}
    for value in list(fixed.graph.value_info) + list(fixed.graph.input) + list(fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in fixed.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def bench_feeds(
    model: onnx.ModelProto, batch: int, input_shapes: dict[str, list[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs; a dynamic first dimension becomes `batch`, other dynamic dimensions get
    verification's default size. Integer inputs that index constant tables get valid indices, other
    integer inputs [0, 10) (latency does not depend on their meaning)."""
    return random_feeds(model, input_shapes, np.random.default_rng(seed), strict=False, batch=batch)


def make_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return runtime.session(model, threads)


def interleaved_times(
    sessions: list, feeds: dict, runs: int, warmup: int, progress: Progress | None = None
) -> list[list[float]]:
    """Seconds per run for each session; each round runs all sessions, alternating the order."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times = [[] for _ in sessions]
    progress = progress or silent()
    progress.total = max(runs, 1)
    for r in range(runs):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - start)
        progress.advance()
    progress.close()
    return times


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    q25, median, q75 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(median),
        "iqr_ms": float(q75 - q25),
        "p25_ms": float(q25),
        "p75_ms": float(q75),
        "runs": len(ms),
    }


def speedup(baseline_median: float, median: float) -> float:
    """How many times faster than the baseline (ratio of medians)."""
    if median <= 0:
        raise ValueError("a latency must be positive")
    return baseline_median / median


def efficiency(measured_speedup: float, macs_before: int, macs_after: int) -> float | None:
    """Measured speedup as a fraction of the ideal one, the MAC ratio."""
    if not macs_after or not macs_before:
        return None
    return measured_speedup / (macs_before / macs_after)


def benchmark(
    models: list[tuple[str, onnx.ModelProto, int]],
    batch: int = 1,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    input_shapes: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Benchmark (label, model, file size) entries on the same inputs; the first is the baseline.

    Args:
        models (list[tuple[str, onnx.ModelProto, int]]): label, model and its file size in bytes.
        batch (int, default 1): the batch of a dynamic batch dimension.
        threads (int, default 1): ONNX Runtime intra-op threads (0: all cores).
        runs (int, default 50): timed runs per model, interleaved.
        warmup (int, default 5): untimed runs per model first.
        input_shapes (dict | None, default None): {input name: shape} for the feeds.
        progress (Progress | None, default None): progress display.

    Returns:
        dict: batch, inputs (the shapes fed), threads, runs, warmup, models (per model: params,
        macs, file_size, median_ms, iqr_ms..., speedup, ideal_speedup, efficiency), warnings.
        Sessions run on `condense_graph.runtime.PROVIDERS`."""
    feeds = bench_feeds(models[0][1], batch, input_shapes or {})
    sessions = [make_session(model, threads) for _, model, _ in models]
    times = interleaved_times(sessions, feeds, runs, warmup, progress)
    entries, warnings = [], []
    for (label, model, size), seconds in zip(models, times, strict=True):
        entries.append(
            {
                "model": label,
                "params": count_params(model),
                "macs": count_macs(model, feeds, warnings),
                "file_size": size,
                **latency_summary(seconds),
            }
        )
    for entry in entries:
        entry["speedup"] = speedup(entries[0]["median_ms"], entry["median_ms"])
        entry["ideal_speedup"] = entries[0]["macs"] / entry["macs"] if entry["macs"] else None
        entry["efficiency"] = efficiency(entry["speedup"], entries[0]["macs"], entry["macs"])
    return {
        "batch": batch,
        "inputs": {name: list(np.shape(values)) for name, values in feeds.items()},  # as fed
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "models": entries,
        "warnings": warnings,
    }
