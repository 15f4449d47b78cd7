"""Where a data-aware reduction spends its time: the selector (structured OBS) against statistics
capture and the refit, on the paper's MLP and a ResNet-50-sized CNN at 50 %; peak memory.

Cases (`model:method`), each run in a fresh subprocess so that every peak RSS is its own:

- `mlp:obs`, `mlp:magnitude`, `mlp:condense`: the paper's MLP 23-3200-1600-800-400-23 (6.8M
  params, `models.paper_mlp`: random weights with planted condensation), --mlp-rows standard
  normal calibration rows, every reducible layer asked for half its width (`layer_widths`);
- `resnet:obs`: the ResNet-50-sized CNN of bench_memory (23.5M params with 10 classes, random
  weights and BN statistics, 32x32 inputs), --resnet-images standard normal images, every
  reducible layer at half its width (`layer_widths`: the selector halves, as on the MLP);
- `resnet-target:obs`: the same with `target_params=0.5` (the global width allocation: every layer
  planned alone down to its floor first, `condense_graph.allocate`).

Every call is `cg.condense(model, calibration=..., method=...)` (no verify: all rows calibrate).
Timed inside it, by wrapping the functions (seconds summed over calls):
  OBS         `condense_graph.obs.removal_order` (the greedy structured OBS);
  statistics  `condense_graph.calibration.layer_statistics` (the selector's Grams: ONNX Runtime
              runs of the network reduced so far, accumulated in float64);
  refit       `refit_statistics` (normal equations: reduced and original network runs) plus
              `compensate` (the least-squares solves);
  materialize the reduced network rebuilt before each capture;
  other       the rest (analysis, exact merges, rewrite, export, checks).
Threads: the defaults (ONNX Runtime and BLAS use every core). Peak RSS = ru_maxrss of the case's
process; "loaded" = its RSS before the call (model, data, imports). CPU = the process's CPU
seconds during the call (all threads): on a busy machine wall time can exceed it.

    python benchmarks/bench_selector.py [--cases mlp:obs mlp:magnitude mlp:condense resnet:obs]
        [--mlp-rows 2000] [--resnet-images 500] [--repeat 1] [--out-dir DIR] [--reuse] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = ["mlp:obs", "mlp:magnitude", "mlp:condense", "resnet:obs"]
PARTS = ["obs", "statistics", "refit", "materialize"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def resnet_onnx(size: int = 32) -> onnx.ModelProto:
    from bench_memory import resnet50_onnx  # benchmarks/ is on sys.path: this script's directory

    return resnet50_onnx(size)


class Timers:
    """Wrap module attributes so that every call adds its wall time to a named total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, module, attribute: str, part: str) -> None:
        original = getattr(module, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started
                self.calls[part] += 1

        setattr(module, attribute, timed)


def install_timers() -> Timers:
    import condense_graph.calibration as calibration
    import condense_graph.obs as obs
    import passes.condense_channels as condense_channels

    timers = Timers()
    timers.wrap(obs, "removal_order", "obs")  # selectors.py imports it from the module per call
    timers.wrap(condense_channels, "layer_statistics", "statistics")
    timers.wrap(calibration, "layer_statistics", "statistics")  # allocate.py imports it per call
    timers.wrap(condense_channels, "refit_statistics", "refit")
    timers.wrap(condense_channels, "compensate", "refit")
    timers.wrap(condense_channels, "materialize", "materialize")
    return timers


def reducible_widths(model: onnx.ModelProto) -> dict[str, int]:
    from passes.condense_channels import CondenseChannelsPass

    _, analysis = CondenseChannelsPass.analyze(model)
    return {layer.name: layer.producer.width for layer in analysis.layers}


def run_case(case: str, mlp_rows: int, resnet_images: int) -> dict:
    """One measurement in this process (the child side)."""
    import condense_graph as cg

    model_name, method = case.split(":")
    rng = np.random.default_rng(0)
    if model_name == "mlp":
        from models import paper_mlp

        model = paper_mlp()
        data = rng.standard_normal((mlp_rows, 23)).astype(np.float32)
        rows = f"{mlp_rows} x 23"
    else:
        model = resnet_onnx()
        data = rng.standard_normal((resnet_images, 3, 32, 32)).astype(np.float32)
        rows = f"{resnet_images} x 3x32x32"
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    widths = reducible_widths(model)
    target = {"target_params": 0.5} if model_name == "resnet-target" else {"layer_widths": {}}
    if "layer_widths" in target:
        target["layer_widths"] = {name: width // 2 for name, width in widths.items()}
    timers = install_timers()
    loaded = current_rss_gb()
    started, cpu = time.perf_counter(), time.process_time()
    result = cg.condense(model, calibration={"x": data}, method=method, **target)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu
    seconds = dict(timers.seconds)
    return {
        "case": case,
        "model": model_name,
        "method": method,
        "params": params,
        "params_after": result.report["params_after"],
        "layers": len(widths),
        "rows": rows,
        "target": "target_params=0.5" if model_name == "resnet-target" else "each layer at 1/2",
        "total_s": total,
        "cpu_s": cpu,
        **{f"{part}_s": seconds.get(part, 0.0) for part in PARTS},
        "calls": dict(timers.calls),
        "other_s": total - sum(seconds.get(part, 0.0) for part in PARTS),
        "loaded_gb": loaded,
        "peak_gb": peak_rss_gb(),
    }


def median_run(runs: list[dict]) -> dict:
    """The runs of one case with every time and memory replaced by its median over the runs."""
    merged = dict(runs[0], runs=len(runs))
    for key, value in runs[0].items():
        if key.endswith(("_s", "_gb")) and isinstance(value, float):
            merged[key] = statistics.median(run[key] for run in runs)
    return merged


def table(results: list[dict]) -> str:
    header = (
        "| model | method | runs | calibration rows | widths | params after | total (CPU) | OBS | "
        "statistics | refit | materialize | other | peak RSS (loaded) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    names = {"mlp": "paper MLP", "resnet": "ResNet-50-sized CNN", "resnet-target": "ResNet-50-sized CNN"}
    lines = [header]
    for r in results:
        calls = r["calls"]
        cpu = f"{r['cpu_s']:.0f} s" if "cpu_s" in r else "n/a"
        lines.append(
            f"| {names[r['model']]} {r['params'] / 1e6:.1f}M | {r['method']} | {r['runs']} | "
            f"{r['rows']} | {r['target']} | "
            f"{r['params_after'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M | "
            f"{r['total_s']:.1f} s ({cpu}) | "
            f"{r['obs_s']:.1f} s ({calls.get('obs', 0)}) | {r['statistics_s']:.1f} s "
            f"({calls.get('statistics', 0)}) | {r['refit_s']:.1f} s | {r['materialize_s']:.1f} s | "
            f"{r['other_s']:.1f} s | {r['peak_gb']:.2f} GB ({r['loaded_gb']:.2f} GB) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--mlp-rows", type=int, default=2000)
    parser.add_argument("--resnet-images", type=int, default=500)
    parser.add_argument("--out-dir", default=None, help="keep each case's JSON here (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (the table: medians)")
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --out-dir")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence written under the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.mlp_rows, args.resnet_images)), flush=True)
        return
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_selector_"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases:
        path = out / f"{case.replace(':', '_')}.json"  # one JSON line per run
        runs = (
            [json.loads(line) for line in path.read_text().splitlines()]
            if args.reuse and path.exists()
            else []
        )
        for _ in range(max(args.repeat - len(runs), 0)):
            command = [sys.executable, __file__, "--child", case]
            command += ["--mlp-rows", str(args.mlp_rows), "--resnet-images", str(args.resnet_images)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            path.write_text("".join(json.dumps(run) + "\n" for run in runs))
            print(json.dumps(runs[-1]), flush=True)
        results.append(median_run(runs))
    text = table(results)
    print(text)
    if not args.no_write:
        from results import write_section

        write_section(
            "selector",
            "Selector time and peak memory at 50 % (structured OBS vs statistics and refit)",
            "Rerun: `python benchmarks/bench_selector.py` (`--repeat N`: medians of N runs; "
            "`--reuse --out-dir DIR` keeps the runs made). Each case is one "
            "`cg.condense(model, calibration=..., method=...)` in a fresh process, default "
            "threads (ONNX Runtime and BLAS on every core); calibration inputs are standard "
            "normal, all rows calibrate (no verify). Widths: every reducible layer asked for half "
            "its width (`layer_widths`), or `target_params=0.5` (global allocation). Time inside: "
            "OBS = `obs.removal_order` (calls in brackets), statistics = "
            "`calibration.layer_statistics` (the selector's Grams; calls in brackets), refit = "
            "`refit_statistics` + `compensate`, materialize = the reduced network rebuilt before "
            "each capture, other = the rest; CPU = the process's CPU seconds in the call (all "
            "threads). Peak RSS = ru_maxrss of the case's process (loaded: RSS with model and "
            "data in memory, before the call).\n\n" + text + (f"\n\n{args.note}" if args.note else ""),
        )


if __name__ == "__main__":
    main()
