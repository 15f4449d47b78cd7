"""Command line: `condense-graph reduce|inspect|verify|bench`.

Exit codes: 0 done, 1 verification failed (nothing written unless --force), 2 bad input or usage
(one line), 3 internal error: a bug of condense-graph, an unexpected exception or a reduced model
that fails the safety checks (one line; nothing written). `--debug`, before or after the command,
shows the traceback instead. A closed stdout (`| head`) ends the output quietly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import onnx

from condense_graph import __version__, model_io, runtime
from condense_graph.api import (
    FLAGS,
    HOLDOUT_FRACTION,
    INSPECT_THRESHOLDS,
    MIN_WIDTH_FRACTION,
    condense,
    inspect,
)
from condense_graph.bench import benchmark
from condense_graph.errors import CondenseError, InternalError
from condense_graph.model_io import load_model, serialized_size
from condense_graph.progress import Progress
from condense_graph.report import (
    format_bench_table,
    format_inspect_table,
    format_reduce_table,
    format_verify_table,
)
from condense_graph.safety import BUG
from condense_graph.selectors import ALIASES, AUTO, OBS_DAMPING, StructuredOBS, method_names, names
from condense_graph.verify import (
    DEFAULT_BATCH,
    DEFAULT_DIM,
    DEFAULT_MIN_COSINE,
    DEFAULT_RTOL,
    Tolerances,
    breaches,
    check_agreement_applies,
    check_agreement_measured,
    compare_models,
    fixed_batch,
    load_data,
    parse_input_shape,
)

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
DEFAULT_SHAPES = f"{DEFAULT_BATCH} for the batch, {DEFAULT_DIM} otherwise"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, in one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


EPILOG = """exit codes: 0 success, 1 verification failed, 2 user error, 3 internal error (a bug).

examples:
  condense-graph reduce model.onnx small.onnx --threshold 0.99 --verify
  condense-graph reduce model.onnx small.onnx --data calib.npz --max-error 0.01 --verify --bench
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="condense-graph",
        description="Merge condensed neurons of ONNX models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"condense-graph {__version__}")
    _add_debug(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_reduce(commands.add_parser("reduce", help="write a reduced model"))
    insp = commands.add_parser("inspect", help="list reducible layers and their widths")
    insp.add_argument("input", help="input .onnx model")
    insp.add_argument("--json", metavar="FILE.json", help="also write the listing as JSON")
    insp.add_argument(
        "--thresholds",
        metavar="T1,T2,...",
        help="the thresholds to list each layer's width at (default 0.8,0.9,0.95,0.99,0.999): pick "
        "per-layer thresholds for `reduce --layer NAME=T` by hand (the paper's section 2.4.1)",
    )
    insp.add_argument(
        "--plot",
        metavar="DIR",
        help="draw each layer's width left at each threshold into DIR/thresholds.png (matplotlib)",
    )
    insp.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_finetune(
        commands.add_parser(
            "finetune", help="reduce and retrain a model on data, without its training code (torch extra)"
        )
    )
    _add_verify(commands.add_parser("verify", help="compare two models in ONNX Runtime"))
    _add_bench(commands.add_parser("bench", help="measure ONNX Runtime latency of one or two models"))
    for command in commands.choices.values():
        _add_debug(command, default=argparse.SUPPRESS)  # after the command too, not clobbering
    return parser


def _add_debug(parser, default) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an error instead of one line",
    )


def _add_reduce(reduce) -> None:
    reduce.add_argument("input", help="input .onnx model (never modified)")
    reduce.add_argument("output", help="output .onnx path (written atomically)")
    _add_sizes(reduce.add_argument_group("how much to reduce"))
    _add_method(reduce.add_argument_group("how channels are chosen"))
    _add_checks(reduce.add_argument_group("checks and output"))


def _add_sizes(group) -> None:
    group.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity at or above which neurons merge (default 0.95)",
    )
    group.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="NAME=T",
        help="threshold for one layer (node or weight name); repeatable",
    )
    group.add_argument(
        "--layer-width",
        action="append",
        default=[],
        metavar="NAME=W",
        help="width to reach for one layer (the threshold landing on it is found)",
    )
    group.add_argument(
        "--target-params",
        type=float,
        metavar="R",
        help="keep this fraction of the parameters: one width fraction for all layers, or with --data "
        "(--method obs) per-layer widths chosen globally by their OBS costs",
    )
    group.add_argument(
        "--target-macs",
        type=float,
        metavar="R",
        help="keep this fraction of the multiply-accumulates (needs --data): widths chosen globally",
    )
    group.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="the smallest model whose relative output error (max_rel_err) on held-out rows of --data "
        "stays within E: per-layer widths chosen globally by their OBS costs, each step measured",
    )
    group.add_argument(
        "--min-width-fraction",
        type=float,
        default=MIN_WIDTH_FRACTION,
        metavar="F",
        help="--target-params cuts no layer below this fraction of its width "
        f"(default {MIN_WIDTH_FRACTION:g}); an unreachable target is an error",
    )
    group.add_argument(
        "--round-to",
        type=int,
        default=1,
        metavar="N",
        help="round every new width up to a multiple of N (8 or 16 suit CPU kernels), requested widths too",
    )


def _add_method(group) -> None:
    group.add_argument(
        "--data",
        metavar="FILE.npz",
        help="calibration data (arrays named after the graph inputs): refit consumers",
    )
    group.add_argument(
        "--method",
        choices=method_names(),
        default=AUTO,
        help="how channels are chosen: 'auto' (default) is 'obs' with --data and 'condense' without; "
        "'obs': exact merges, then structured Optimal Brain Surgeon on --data, then a refit; "
        "'condense': the paper's cosine merge; 'activations': cosine of --data activations; "
        "'magnitude': the pruning baseline (needs widths)",
    )
    group.add_argument(
        "--obs-damping",
        type=float,
        default=OBS_DAMPING,
        metavar="D",
        help=f"--method obs damps each consumer's Hessian by D * its mean diagonal (default {OBS_DAMPING:g})",
    )
    group.add_argument(  # deprecated: --method; 'weights' is 'condense'
        "--similarity", choices=sorted(ALIASES) + names(), help=argparse.SUPPRESS
    )


def _add_checks(group) -> None:
    group.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    group.add_argument(
        "--verify",
        action="store_true",
        help="compare both models in ONNX Runtime on random inputs or, with --data, "
        "on held-out rows of the data that do not calibrate",
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=HOLDOUT_FRACTION,
        metavar="FRACTION",
        help=f"with --data and --verify: the last FRACTION of the rows verify (default {HOLDOUT_FRACTION:g})",
    )
    _add_tolerances(group)
    _add_input_shapes(group, f"shape of a graph input (dynamic dims default to {DEFAULT_SHAPES})")
    group.add_argument(
        "--force",
        action="store_true",
        help="write the output even when verification fails (exit code stays 1)",
    )
    group.add_argument("--in-place", action="store_true", help="allow OUTPUT to be INPUT")
    group.add_argument(
        "--external-data",
        action="store_true",
        help="save the weights in OUTPUT.data (automatic above the 2 GB protobuf limit)",
    )
    group.add_argument("--bench", action="store_true", help="benchmark the written model against the input")
    _add_bench_options(group)
    _add_providers(group)
    group.add_argument("--plot", metavar="DIR", help="write cosine heatmaps and a width chart (PNG)")
    _add_output_level(group)


def _add_finetune(parser) -> None:
    """`finetune`: the automatic loop (paper section 2.4.2) on an ONNX model rebuilt in torch."""
    parser.add_argument("input", help="trained .onnx model (never modified)")
    parser.add_argument("output", help="output .onnx path (written atomically)")
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE.npz",
        help="arrays named after the graph inputs, and the targets",
    )
    parser.add_argument("--targets", required=True, metavar="KEY", help="the targets' array in --data")
    parser.add_argument("--loss", required=True, choices=("mse", "cross-entropy"), help="the training loss")
    parser.add_argument(
        "--tolerance",
        type=float,
        help="how much worse than the input the result may be on the held-out rows: a relative "
        "loss increase for mse (default 0.05), accuracy points for cross-entropy (default 0.01)",
    )
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="held-out fraction of the rows (default 0.2)"
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--max-error",
        type=float,
        help="reduce each layer as far as the data-aware rule keeps the output error within this, "
        "instead of the paper's thresholds",
    )
    target.add_argument(
        "--width-fraction", type=float, help="reduce each layer to this fraction of its width instead"
    )
    parser.add_argument("--batch", type=int, default=128, help="rows per training step (default 128)")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="Adam's learning rate after a reduction (eq. 21's lr_max)"
    )
    parser.add_argument("--max-main", type=int, default=6, help="most main reductions (default 6)")
    parser.add_argument("--max-steps", type=int, help="training step budget of the whole run")
    parser.add_argument("--seed", type=int, default=0, help="the split and the batches (default 0)")
    parser.add_argument("--log", metavar="FILE.json", help="every event of the loop as JSON, as it goes")
    parser.add_argument(
        "--plot", metavar="DIR", help="draw the metric and params against the step (DIR/loop.png)"
    )
    parser.add_argument("--report", metavar="FILE.json", help="write the summary as JSON")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write the output even when it misses the tolerance (exit code stays 1)",
    )
    parser.add_argument("--in-place", action="store_true", help="allow OUTPUT to be INPUT")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_output_level(parser) -> None:
    """--quiet and -v/--verbose (the progress lines, `progress.Progress`)."""
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="one progress line per layer or step (on a terminal too)"
    )


def _add_tolerances(parser) -> None:
    parser.add_argument(
        "--rtol",
        type=float,
        help="largest max_rel_err (max |diff| / max |original|) accepted "
        f"(default {DEFAULT_RTOL:g}; inf switches it off)",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        help=f"smallest output cosine accepted (default {DEFAULT_MIN_COSINE:g}; -1 switches it off)",
    )
    parser.add_argument("--atol", type=float, help="largest max_abs_err accepted (no default)")
    parser.add_argument(
        "--min-agreement",
        type=float,
        help="smallest top-1 agreement accepted; every [batch, classes] output is then "
        "class scores, and an error if there is none",
    )


def _tolerances(args) -> Tolerances:
    return Tolerances.given(args.atol, args.rtol, args.min_cosine, args.min_agreement)


def _add_verify(verify) -> None:
    verify.add_argument("original", help="the reference model")
    verify.add_argument("reduced", help="the model to check")
    verify.add_argument("--data", metavar="FILE.npz", help="inputs: arrays named after the graph inputs")
    verify.add_argument("--labels", metavar="KEY", help="array of class labels in the --data file")
    _add_input_shapes(
        verify, f"shape of a graph input for random inputs (dynamic dims default to {DEFAULT_SHAPES})"
    )
    verify.add_argument("--runs", type=int, default=4, help="random draws without --data (default 4)")
    verify.add_argument(
        "--batch-size", type=int, help="rows per run with --data (default 256; a fixed-batch model: its own)"
    )
    _add_tolerances(verify)
    _add_providers(verify)
    verify.add_argument("--report", metavar="FILE.json", help="write the numbers as JSON")
    _add_output_level(verify)


def _add_bench(bench) -> None:
    bench.add_argument("model", help="baseline model")
    bench.add_argument("other", nargs="?", help="model to compare with the baseline")
    _add_input_shapes(bench, "shape of a graph input (a dynamic batch dim defaults to --batch)")
    _add_bench_options(bench)
    _add_providers(bench)
    bench.add_argument("--report", metavar="FILE.json", help="write the numbers as JSON")
    _add_output_level(bench)


def _add_bench_options(parser) -> None:
    parser.add_argument("--batch", type=int, default=1, help="batch size for benchmarking (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument(
        "--runs", dest="bench_runs", type=int, default=50, help="timed runs per model (default 50)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")


def _add_providers(parser) -> None:
    parser.add_argument(
        "--providers",
        metavar="P[,P...]",
        help="ONNX Runtime execution providers for calibration, verification and benchmarks, in order "
        "of preference: cuda,cpu or CUDAExecutionProvider,CPUExecutionProvider (default cpu); "
        "one this onnxruntime does not have is an error",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:  # graph-optimizer notes ORT prints on its own logger are not ours to show
        runtime.quiet_runtime_logs()
    commands = {
        "reduce": run_reduce,
        "inspect": run_inspect,
        "verify": run_verify,
        "bench": run_bench,
        "finetune": run_finetune,
    }
    try:
        # every session of this run (runtime.session) on --providers; the default restored after
        with runtime.using_providers(getattr(args, "providers", None)):
            return commands[args.command](args)
    except Exception as err:  # noqa: BLE001 - every failure ends as one line and an exit code
        if args.debug:
            raise
        return _report_error(err)


# an API parameter in a message, with the flag some messages add after it: shown as the flag alone
_PARAMETER = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")\b(?: \((--[a-z-]+)\))?")


def cli_message(message: str) -> str:
    """A CondenseError's message as the command line says it: API parameters (`target_params`,
    `round_to`...) become the flags that set them (`--target-params`, `--round-to`)."""
    message = _PARAMETER.sub(lambda m: FLAGS[m.group(1)], message)
    for option in FLAGS.values():  # 'max_error 0.1 (--max-error)': the flag said once
        if message.count(option) > 1:
            message = message.replace(f" ({option})", "")
    return re.sub(r"^threshold must", "--threshold must", message)


def _report_error(err: Exception) -> int:
    """One line on stderr; the exit code says whose problem it is (user: 2, ours: 3)."""
    if isinstance(err, CondenseError):
        print(f"condense-graph: error: {cli_message(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(err, InternalError):  # the safety net's messages already say it is a bug
        text = str(err) if str(err).startswith(BUG) else f"{BUG}: {err}"
        print(f"condense-graph: {text}; rerun with --debug for the traceback", file=sys.stderr)
    else:
        message = " ".join(str(err).split())
        print(
            f"condense-graph: {BUG}: {type(err).__name__}: {message}; rerun with --debug for the traceback",
            file=sys.stderr,
        )
    return EXIT_INTERNAL


def _say(text: str) -> None:
    """Print to stdout; a reader that went away (`| head`) silences the rest, not the exit code."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # further writes (and the interpreter's final flush) go nowhere instead of failing
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass


def _progress(args, label: str) -> Progress:
    enabled = None if not getattr(args, "quiet", False) else False
    progress = Progress(1, label, enabled=enabled, every=getattr(args, "verbose", False))
    say = progress.say
    progress.say = lambda line: say(cli_message(line))  # search steps name flags, as errors do
    return progress


def _method(args):
    """The rule --method names (or the deprecated --similarity), with --obs-damping applied."""
    method = args.method
    if args.similarity is not None:
        print("condense-graph: --similarity is deprecated; use --method", file=sys.stderr)
        method = ALIASES.get(args.similarity, args.similarity)
    if not args.obs_damping > 0:
        raise CondenseError(f"--obs-damping must be positive, got {args.obs_damping:g}")
    with_obs = method == "obs" or (method == AUTO and args.data is not None)
    return StructuredOBS(args.obs_damping) if with_obs else method


def run_reduce(args) -> int:
    _check_paths(args)
    if args.plot:  # before any work: a missing matplotlib must not cost a reduction
        from condense_graph.plots import check_available

        check_available()
    tolerances = _tolerances(args)
    result = condense(args.input, **_condense_arguments(args))
    report = result.report
    failures = _judge(report["verify"], tolerances) if args.verify else []
    written, weights = not failures or args.force, None
    if written:  # the input's layout kept: external data in, external data out
        result.save(args.output, True if args.external_data else None)  # sets file_size_after
        weights = _external_data(args, result)
    if args.plot:
        from condense_graph.plots import plot_reduction

        report["plots"] = [str(p) for p in plot_reduction(result.plans, args.plot)]
    if args.bench and written:
        models = [
            (args.input, load_model(args.input), report["file_size_before"]),
            (args.output, result.model, report["file_size_after"]),  # the bytes written
        ]
        report["bench"] = _bench(args, models, _input_shapes(args))
    elif args.bench:
        report["bench_skipped"] = "verification failed: the model was not written (--force writes it)"
    if args.report:
        _write_json(report, args.report)
    if not args.quiet:
        _print_reduce(args, report, failures)
        if written and weights:
            _say(f"Weights: in {weights[0]} ({weights[1]})")
    return EXIT_VERIFY_FAILED if failures else EXIT_OK


def _external_data(args, result) -> tuple[str, str] | None:
    """Where the written weights went when not in the model file, and why (`save_model`'s rule)."""
    if not model_io.uses_external_data(onnx.load(args.output, load_external_data=False)):
        return None
    if args.external_data:
        why = "--external-data"
    elif result.external_data:
        why = "as in the input, which keeps its weights in external data"
    elif model_io.is_large(result.model):
        why = "the model is over the 2 GB protobuf limit"
    else:
        why = "saved with external data"
    return f"{args.output}.data", why


def _condense_arguments(args) -> dict:
    """`condense`'s keyword arguments from reduce's command line."""
    layer_widths = {
        name: _as_width(value, spec)
        for spec in args.layer_width
        for name, value in [_parse_layer(spec, "--layer-width", "NAME=WIDTH")]
    }
    return dict(
        threshold=args.threshold,
        layer_thresholds=dict(_parse_layer(spec) for spec in args.layer),
        verify=args.verify,
        input_shapes=_input_shapes(args),
        progress=_progress(args, "condensing layers"),
        round_to=args.round_to,
        calibration=args.data,
        method=_method(args),
        layer_widths=layer_widths,
        target_params=args.target_params,
        target_macs=args.target_macs,
        max_error=args.max_error,
        holdout=args.holdout,
        min_width_fraction=args.min_width_fraction,
        all_class_scores=args.min_agreement is not None,
    )


def _input_shapes(args) -> dict[str, list[int]]:
    """--input-shape (repeated) and --input-shapes (several values), as {name: shape}."""
    specs = list(args.input_shape) + list(args.input_shapes or [])
    return dict(parse_input_shape(spec) for spec in specs)


def _add_input_shapes(parser, help: str) -> None:
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...", help=help)
    parser.add_argument(
        "--input-shapes",
        nargs="+",
        metavar="NAME:D0,D1,...",
        help="several input shapes at once, brackets allowed: x:[1,3,224,224] y:1,16 (onnxslim spelling)",
    )


def _judge(verify: dict, tolerances: Tolerances) -> list[str]:
    """The breaches of `tolerances`; the verdict and the tolerances go into the report too."""
    if tolerances.min_agreement is not None:
        check_agreement_measured(verify)
    failures = breaches(verify, tolerances)
    verify["tolerances"] = {
        "rtol": tolerances.rtol,
        "min_cosine": tolerances.min_cosine,
        "atol": tolerances.atol,
        "min_agreement": tolerances.min_agreement,
        "defaults": sorted(tolerances.defaults),
    }
    verify["pass"] = not failures
    return failures


def _print_reduce(args, report: dict, failures: list[str]) -> None:
    _say(cli_message(format_reduce_table(report)))  # "... for --target-params 0.5"
    if args.verify:
        _say(format_verify_table(report["verify"]))
        _say(_verdict(failures, _tolerances(args), args.force, args.output))
    elif not failures:
        _say(f"Wrote {args.output}")
    if not any(layer["width_after"] < layer["width_before"] for layer in report["layers"]):
        _say(_nothing_reduced_hint(args, report))
    if "bench" in report:
        _say(format_bench_table(report["bench"]))
    elif "bench_skipped" in report:
        _say(f"Bench: skipped ({report['bench_skipped']})")
    for path in report.get("plots", []):
        _say(f"Plot: {path}")


def _nothing_reduced_hint(args, report: dict) -> str:
    """Said instead of a silent 'Wrote X (+0.0 %)': what to try next."""
    if not report["layers"]:
        return "Nothing was reduced: no reducible layer (see Skipped above)."
    how = f"at threshold {args.threshold:g}" if args.data is None else f"with --method {report['method']}"
    return (
        f"Nothing was reduced {how}. Try `condense-graph inspect {args.input}` for the widths at other "
        "thresholds, --target-params R for a size, or --data FILE.npz for the data-aware rule."
    )


def _verdict(failures: list[str], tolerances: Tolerances, force: bool, output: str | None) -> str:
    """'Verify: PASS (...)' or 'Verify: FAIL (breaches; tolerances ...)', and what was written."""
    if not failures:
        return f"Verify: PASS ({tolerances.describe()})" + (f"; wrote {output}" if output else "")
    detail = "; ".join(failures)
    line = f"Verify: FAIL ({detail}; tolerances: {tolerances.describe()})"
    if output is None:
        return line
    return f"{line}; " + ("wrote it anyway (--force)" if force else "output not written")


def run_inspect(args) -> int:
    thresholds = INSPECT_THRESHOLDS if args.thresholds is None else _parse_thresholds(args.thresholds)
    if args.plot:
        from condense_graph.plots import check_available

        check_available()  # before any work
    info = inspect(args.input, thresholds=thresholds)
    if not args.quiet:
        _say(format_inspect_table(info))
    if args.json:
        _write_json(info, args.json)
    if args.plot:
        from condense_graph.plots import plot_threshold_widths

        path = plot_threshold_widths(info, args.plot)
        if not args.quiet:
            _say(f"Plot: {path}")
    return EXIT_OK


def run_finetune(args) -> int:
    """Reduce and retrain (`condense_graph.finetune`); exit 1 when the result misses the tolerance
    on the held-out rows (then nothing is written unless --force)."""
    from dataclasses import replace

    from condense_graph.finetune import finetune, finetune_config

    _check_paths(args)
    if args.plot:
        from condense_graph.plots import check_available

        check_available()
    for name in ("batch", "max_main"):
        if getattr(args, name) < 1:
            raise CondenseError(f"--{name.replace('_', '-')} must be at least 1")
    config = replace(finetune_config(args.lr), max_main=args.max_main, max_steps=args.max_steps)
    result = finetune(
        args.input,
        args.data,
        args.targets,
        args.loss,
        holdout=args.holdout,
        tolerance=args.tolerance,
        max_error=args.max_error,
        width_fraction=args.width_fraction,
        batch=args.batch,
        config=config,
        seed=args.seed,
        log_path=args.log,
        quiet=args.quiet,
    )
    report = result.report
    met = report["criterion_met"]
    if met or args.force:
        report["file_size_after"] = model_io.save_model(result.model, args.output)
    if args.plot:
        from condense_graph.plots import plot_loop

        report["plot"] = str(plot_loop(result.loop.log, Path(args.plot) / "loop.png", report["metric"]))
    if args.report:
        _write_json(report, args.report)
    if not args.quiet:
        _say(format_finetune(report, args.output if met or args.force else None))
    return EXIT_OK if met else EXIT_VERIFY_FAILED


def format_finetune(report: dict, written: str | None) -> str:
    """The summary lines of `finetune`."""
    better = "lower" if report["loss"] == "mse" else "higher"
    lines = [
        f"Params: {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.3f})",
        "Widths: " + ", ".join(f"{name} {a} -> {b}" for name, (a, b) in report["widths"].items()),
        f"Held-out {report['metric']} ({better} is better, {report['validation_rows']} rows, ONNX Runtime): "
        f"{report['metric_before']:.6g} -> {report['metric_after']:.6g}; required {report['criterion']:.6g}: "
        + ("met" if report["criterion_met"] else "MISSED"),
        f"Loop: {report['steps']} training steps, {report['reductions_kept']} reductions kept, "
        f"{report['rollbacks']} rolled back, {report['seconds']:.1f} s; stopped: {report['stop_reason']}",
    ]
    if written:
        lines.append(f"Wrote {written}")
    else:
        lines.append("Nothing written: the result misses the tolerance (--force writes it)")
    return "\n".join(lines)


def _parse_thresholds(spec: str) -> tuple[float, ...]:
    """'0.8,0.9,0.99' -> (0.8, 0.9, 0.99); each a cosine in [-1, 1]."""
    try:
        values = tuple(float(v) for v in spec.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(-1.0 <= v <= 1.0 for v in values):
        raise CondenseError(f"--thresholds takes comma-separated cosines in [-1, 1], got {spec!r}")
    return values


def run_verify(args) -> int:
    batch_size = 256 if args.batch_size is None else args.batch_size
    if args.runs < 1 or batch_size < 1:
        raise CondenseError("--runs and --batch-size must be at least 1")
    original, reduced = load_model(args.original), load_model(args.reduced)
    fixed = fixed_batch(original)
    if args.batch_size is not None and fixed is not None and fixed != args.batch_size:
        print(
            f"condense-graph: note: the model takes batches of {fixed}; --batch-size {args.batch_size} "
            "is not used",
            file=sys.stderr,
        )
    data = labels = None
    if args.labels and not args.data:
        raise CondenseError("--labels needs --data")
    if args.data:
        data, labels = load_data(args.data, original, args.labels)
    input_shapes = _input_shapes(args)
    tolerances = _tolerances(args)
    if tolerances.min_agreement is not None:
        check_agreement_applies(original)
    result = compare_models(
        original,
        reduced,
        input_shapes,
        runs=args.runs,
        data=data,
        labels=labels,
        batch_size=batch_size,
        progress=_progress(args, "verifying"),
        all_class_scores=tolerances.min_agreement is not None,
    )
    failures = _judge(result, tolerances)
    if args.report:
        _write_json(result, args.report)
    if not args.quiet:
        _say(format_verify_table(result))
        _say(_verdict(failures, tolerances, False, None))
    return EXIT_VERIFY_FAILED if failures else EXIT_OK


def run_bench(args) -> int:
    paths = [args.model] + ([args.other] if args.other else [])
    input_shapes = _input_shapes(args)
    models = [(p, model, serialized_size(model)) for p in paths for model in [load_model(p)]]
    result = _bench(args, models, input_shapes)
    if args.report:
        _write_json(result, args.report)
    if not args.quiet:
        _say(format_bench_table(result))
    return EXIT_OK


def _bench(args, models, input_shapes) -> dict:
    """Benchmark (label, model, file size) entries, the first the baseline."""
    if args.batch < 1 or args.bench_runs < 1 or args.threads < 0 or args.warmup < 0:
        raise CondenseError("--batch and --runs must be positive, --threads and --warmup not negative")
    return benchmark(
        models,
        args.batch,
        args.threads,
        args.bench_runs,
        args.warmup,
        input_shapes,
        progress=_progress(args, "benchmarking"),
    )


def _check_paths(args) -> None:
    source, target = Path(args.input), Path(args.output)
    if target.exists() and source.exists() and os.path.samefile(source, target) and not args.in_place:
        raise CondenseError(f"output {target} is the input; pass --in-place to overwrite it")


def _parse_layer(spec: str, option: str = "--layer", form: str = "NAME=THRESHOLD") -> tuple[str, float]:
    name, sep, value = spec.rpartition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise CondenseError(f"bad {option} '{spec}': expected {form}")


def _as_width(value: float, spec: str) -> int:
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise CondenseError(f"bad --layer-width '{spec}': the width must be a positive integer")
    return int(value)


def _write_json(data: dict, path: str) -> None:
    """Strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number is written as the string
    "nan", "inf" or "-inf", which every JSON parser reads."""
    try:
        Path(path).write_text(json.dumps(_finite_json(data), indent=2, allow_nan=False) + "\n")
    except OSError as err:
        raise CondenseError(f"cannot write {path}: {err.strerror}") from None


def _finite_json(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {key: _finite_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
