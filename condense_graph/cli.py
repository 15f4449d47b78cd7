"""Command line: `condense-graph reduce|inspect`.

Exit codes: 0 done, 1 verification failed (nothing written unless --force), 2 bad input or usage.
User errors print one line; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from condense_graph.api import condense, inspect
from condense_graph.errors import CondenseError
from condense_graph.model_io import save_model
from condense_graph.report import format_inspect_table, format_reduce_table
from condense_graph.verify import parse_input_shape

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, in one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="condense-graph", description="Merge condensed neurons of ONNX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    reduce = commands.add_parser("reduce", help="write a reduced model")
    reduce.add_argument("input", help="input .onnx model (never modified)")
    reduce.add_argument("output", help="output .onnx path (written atomically)")
    reduce.add_argument("--threshold", type=float, default=0.95,
                        help="cosine similarity at or above which neurons merge (default 0.95)")
    reduce.add_argument("--layer", action="append", default=[], metavar="NAME=T",
                        help="threshold for one layer (node or weight name); repeatable")
    reduce.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    reduce.add_argument("--verify", action="store_true",
                        help="compare both models in ONNX Runtime on random inputs")
    reduce.add_argument("--atol", type=float, default=1e-4,
                        help="largest absolute error --verify accepts (default 1e-4)")
    reduce.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="shape of a graph input for --verify (dynamic dims default to 1)")
    reduce.add_argument("--force", action="store_true",
                        help="write the output even when verification fails (exit code stays 1)")
    reduce.add_argument("--in-place", action="store_true", help="allow OUTPUT to be INPUT")
    reduce.add_argument("--quiet", action="store_true", help="print nothing but errors")
    insp = commands.add_parser("inspect", help="list reducible layers and their widths")
    insp.add_argument("input", help="input .onnx model")
    insp.add_argument("--json", metavar="FILE.json", help="also write the listing as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_reduce(args) if args.command == "reduce" else run_inspect(args)
    except CondenseError as err:
        if args.debug:
            raise
        print(f"condense-graph: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def run_reduce(args) -> int:
    _check_paths(args)
    layer_thresholds = dict(_parse_layer(spec) for spec in args.layer)
    input_shapes = dict(parse_input_shape(spec) for spec in args.input_shape)
    result = condense(args.input, args.threshold, layer_thresholds, verify=args.verify,
                      input_shapes=input_shapes)
    report = result.report
    failed = args.verify and report["verify"]["max_abs_err"] > args.atol
    if not failed or args.force:
        report["file_size_after"] = save_model(result.model, args.output)
    if args.report:
        _write_json(report, args.report)
    if not args.quiet:
        print(format_reduce_table(report))
        if args.verify:
            print(_verify_line(report["verify"], args.atol, failed, args.force, args.output))
        elif not failed:
            print(f"Wrote {args.output}")
    return EXIT_VERIFY_FAILED if failed else EXIT_OK


def _verify_line(verify: dict, atol: float, failed: bool, force: bool, output: str) -> str:
    line = (f"Verify: max_abs_err={verify['max_abs_err']:.3g} max_rel_err={verify['max_rel_err']:.3g}"
            f" (atol {atol:g}, {verify['runs']} random runs): ")
    if not failed:
        return line + f"PASS; wrote {output}"
    return line + ("FAIL; wrote it anyway (--force)" if force else "FAIL; output not written")


def run_inspect(args) -> int:
    info = inspect(args.input)
    print(format_inspect_table(info))
    if args.json:
        _write_json(info, args.json)
    return EXIT_OK


def _check_paths(args) -> None:
    source, target = Path(args.input), Path(args.output)
    if target.exists() and source.exists() and os.path.samefile(source, target) and not args.in_place:
        raise CondenseError(f"output {target} is the input; pass --in-place to overwrite it")


def _parse_layer(spec: str) -> tuple[str, float]:
    name, sep, value = spec.rpartition("=")
    try:
        return (name, float(value)) if sep and name else _bad_layer(spec)
    except ValueError:
        return _bad_layer(spec)


def _bad_layer(spec: str):
    raise CondenseError(f"bad --layer '{spec}': expected NAME=THRESHOLD")


def _write_json(data: dict, path: str) -> None:
    try:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        raise CondenseError(f"cannot write {path}: {err.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
