"""Time each stage of the pass on the paper's combustion MLP, 23-3200-1600-800-400-23 (6.8M params).

Random weights with planted condensation: every hidden layer's neurons are positive multiples of a
third as many directions, plus a little noise, so grouping at 0.95 has real work to do. Runs on
one core (BLAS threads pinned to 1 before numpy loads). Prints one line per stage, the median of
--repeat runs.

    python benchmarks/bench_pass.py [--repeat 3] [--threshold 0.95]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from condense_graph.graph import export_like  # noqa: E402
from condense_graph.verify import compare_models  # noqa: E402
from passes.condense_channels import CondenseChannelsPass, rewrite  # noqa: E402

WIDTHS = [23, 3200, 1600, 800, 400, 23]


def paper_mlp(seed: int = 0, noise: float = 0.02) -> onnx.ModelProto:
    """Gemm + Relu MLP; hidden neurons cluster around width/3 directions."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(1, len(WIDTHS)):
        fan_in, width = WIDTHS[i - 1], WIDTHS[i]
        var = ((fan_in + width) / 2) ** -2  # paper eq. 19
        base = rng.normal(0, np.sqrt(var), size=(max(width // 3, 1), fan_in + 1))
        rows = base[rng.integers(0, len(base), width)] * rng.uniform(0.5, 2.0, (width, 1))
        rows += noise * np.sqrt(var) * rng.normal(size=rows.shape)
        inits += [numpy_helper.from_array(rows[:, :-1].astype(np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(rows[:, -1].astype(np.float32), f"fc{i}.bias")]
        nodes.append(helper.make_node("Gemm", [cur, f"fc{i}.weight", f"fc{i}.bias"], [f"h{i}"],
                                      name=f"fc{i}", transB=1))
        cur = f"h{i}"
        if i < len(WIDTHS) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"a{i}"], name=f"relu{i}"))
            cur = f"a{i}"
    graph = helper.make_graph(nodes, "paper_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 23])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", 23])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


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
    times["widths"] = [p.cmap.width_after for p in plans]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    t0 = time.perf_counter()
    model = paper_mlp()
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"model: {'-'.join(map(str, WIDTHS))}, {params:,} params, built in {time.perf_counter() - t0:.2f} s")
    runs = [run_once(model, args.threshold) for _ in range(args.repeat)]
    print(f"threshold {args.threshold}: widths {WIDTHS[1:-1]} -> {runs[0].pop('widths')}")
    for r in runs[1:]:
        r.pop("widths")
    for stage in runs[0]:
        values = [r[stage] for r in runs]
        print(f"  {stage:<38} median {statistics.median(values):7.3f} s  (runs: "
              + ", ".join(f"{v:.3f}" for v in values) + ")")
    total = [r["analyze"] + r["plan (similarity, grouping, merge)"] + r["rewrite + export"] for r in runs]
    print(f"  {'analysis + rewrite (target < 2 s)':<38} median {statistics.median(total):7.3f} s")


if __name__ == "__main__":
    main()
