"""Greedy structured OBS (`condense_graph.obs.removal_order`) time on one core, halving a layer.

Cases: one dense consumer (block 1, 1024 outputs) with d = 1024, 2048, 4096 input channels, and a
conv-like consumer (n = 512 channels, block 9 = a 3x3 kernel, 1024 outputs). Each is halved. Data:
a correlated, bias-consistent Hessian built directly (low-rank covariance plus diagonal), random
weights with per-channel scales. Prints median wall time and the peak memory allocated inside the
call (tracemalloc).

    python benchmarks/bench_obs.py [--sizes 1024 2048 4096 conv] [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
from results import machine_description  # noqa: E402

from condense_graph.obs import ConsumerTerm, removal_order  # noqa: E402

OUTPUTS = 1024
CONV_CHANNELS, CONV_BLOCK = 512, 9
# Above this many features one run is enough (the time is far above timer noise).
SINGLE_RUN_FEATURES = 4000


def correlated_term(channels: int, block: int, seed: int = 0) -> ConsumerTerm:
    """H = N [[S + mu mu^T, mu], [mu^T, 1]] with S = U U^T / r + diag(s): PSD, correlated features."""
    rng = np.random.default_rng(seed)
    features, samples = channels * block, 2 * channels * block
    rank = max(features // 4, 1)
    factors = rng.standard_normal((features, rank))
    mean = rng.standard_normal(features) * 0.5
    hessian = np.empty((features + 1, features + 1))
    hessian[:-1, :-1] = factors @ factors.T / rank + np.outer(mean, mean)
    hessian[np.diag_indices(features)] += rng.uniform(0.05, 1.0, features)
    hessian[-1, :-1] = hessian[:-1, -1] = mean
    hessian[-1, -1] = 1.0
    hessian *= samples
    weights = rng.standard_normal((features + 1, OUTPUTS))
    weights[:-1] *= np.repeat(rng.uniform(0.1, 2.0, channels), block)[:, None]
    return ConsumerTerm(hessian=hessian, weights=weights, block=block)


def measure(term: ConsumerTerm, channels: int, repeat: int) -> tuple[list[float], int, float]:
    """Wall times of halving, peak bytes allocated during the call, relative cost at half width."""
    times, peak, relative = [], 0, 0.0
    for _ in range(repeat):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        result = removal_order([term], floor=channels // 2)
        times.append(time.perf_counter() - started)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - before)
        tracemalloc.stop()
        relative = result.relative_cost(channels // 2)
    return times, peak, relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["1024", "2048", "4096", "conv"], help="dense d values and/or 'conv'"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(machine_description(), flush=True)
    for size in args.sizes:
        channels, block = (CONV_CHANNELS, CONV_BLOCK) if size == "conv" else (int(size), 1)
        term = correlated_term(channels, block)
        features = channels * block
        repeat = 1 if features > SINGLE_RUN_FEATURES else args.repeat
        times, peak, relative = measure(term, channels, repeat)
        print(
            f"n={channels} block={block} features={features} outputs={OUTPUTS} -> {channels // 2}: "
            f"median {statistics.median(times):.2f} s over {repeat} run(s) "
            f"[{', '.join(f'{t:.2f}' for t in times)}], peak {peak / 2**20:.0f} MiB, "
            f"relative cost {relative:.3e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
