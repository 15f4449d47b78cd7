"""Pass time against model size, 0.1M to 30M parameters, on one core; writes benchmarks/RESULTS.md.

Models: MLPs 23-w-w/2-w/4-w/8-23 with planted condensation (`models.mlp`), w chosen
so the parameter count spans 0.1M-30M; the paper's MLP is the 6.8M point. Time = analysis + plan
(similarity, grouping, merge) + rewrite, median of --repeat runs.

    python benchmarks/bench_scaling.py [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402

from models import mlp  # noqa: E402
from results import write_section  # noqa: E402

import condense_graph as cg  # noqa: E402
from passes import CondenseChannelsPass, CondenseOptions  # noqa: E402

WIDTHS = [380, 850, 1700, 3200, 4800, 6760]


def pass_seconds(model, threshold: float) -> float:
    """Analysis + plan + rewrite, as the pass timed them."""
    return sum(CondenseChannelsPass(CondenseOptions(threshold))(model).timings.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rows = ["| hidden widths | params | pass time (median) | runs |", "|---|---|---|---|"]
    for w in WIDTHS:
        widths = [23, w, w // 2, w // 4, w // 8, 23]
        model = mlp(widths)
        params = cg.count_params(model)
        times = [pass_seconds(model, args.threshold) for _ in range(args.repeat)]
        line = (
            f"| {'-'.join(map(str, widths[1:-1]))} | {params / 1e6:.2f}M | "
            f"{statistics.median(times):.3f} s | {', '.join(f'{t:.3f}' for t in times)} |"
        )
        print(line, flush=True)
        rows.append(line)
    write_section(
        "scaling",
        "Pass time against model size (one core)",
        f"MLPs with planted condensation, threshold {args.threshold}; analysis + plan + "
        "rewrite.\nRerun: `python benchmarks/bench_scaling.py`\n\n" + "\n".join(rows),
    )


if __name__ == "__main__":
    main()
