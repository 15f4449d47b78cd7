"""The report of a reduction: numbers for scripts (JSON) and a table for people.

Report keys: params_before, params_after, layers (name, width_before, width_after, threshold,
exact, ...), skipped (name, reason), and when verified `verify` (max_abs_err, max_rel_err).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from condense_graph.model_io import serialized_size
from condense_graph.protos import all_graphs


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant node, inside If/Loop/Scan bodies too, so the
    count before and after is the truth whichever graph holds the weights."""
    return _graph_params(model.graph)


def _graph_params(graph: onnx.GraphProto) -> int:
    total = 0
    for g in all_graphs(graph):
        total += sum(int(np.prod(t.dims)) for t in g.initializer)
        total += sum(
            int(np.prod(a.t.dims))
            for node in g.node
            if node.op_type == "Constant"
            for a in node.attribute
            if a.name == "value"
        )
    return total


def build_report(original: onnx.ModelProto, reduced: onnx.ModelProto, plans, skipped) -> dict:
    return {
        "params_before": count_params(original),
        "params_after": count_params(reduced),
        "file_size_before": serialized_size(original),
        "file_size_after": serialized_size(reduced),
        "layers": [plan.report() for plan in plans],
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
    }


def format_reduce_table(report: dict) -> str:
    """Before/after table in the spirit of onnxslim's summary: per layer its path (kind and
    activation), width, threshold, how parallel the merged neurons were, whether the merge is
    exact and the error it made; then the totals."""
    rows = [("Layer", "Path", "Width", "Threshold", "Min cos", "Exact", "Error")]
    # a rule that selects without a threshold: OBS (data-aware) or pruning
    no_threshold = "obs" if report.get("method") == "obs" else "pruned"
    sources = set()
    for layer in report["layers"]:
        width = _width_change(layer["width_before"], layer["width_after"])
        cos = "-" if layer["min_group_cosine"] is None else f"{layer['min_group_cosine']:.4f}"
        threshold = no_threshold if layer["threshold"] is None else f"{layer['threshold']:.4g}"
        error, source = layer_error(layer)
        sources.add(source)
        rows.append((layer["name"], path(layer), width, threshold, cos, _exact(layer), error))
    rows.append(("Params", "", _change(report["params_before"], report["params_after"]), "", "", "", ""))
    rows.append(
        (
            "File size",
            "",
            _change(report["file_size_before"], report["file_size_after"], _bytes),
            "",
            "",
            "",
            "",
        )
    )
    text = _table(rows, footer_from=len(rows) - 2) + _error_note(sources)
    text += _method_line(report) + _allocation_lines(report)
    return text + _skipped_lines(report["skipped"]) + _warning_lines(report.get("warnings", []))


def path(layer: dict) -> str:
    """What the channels go through: the kind, then the activation ("conv: BatchNormalization+Relu",
    "residual group: Relu"). A depthwise block has the depthwise Conv among its activation ops."""
    op, activation = layer.get("op", ""), layer["activation"]
    if op.endswith(" group"):
        kind = op
    elif "Conv" in activation.split("+"):
        kind = "depthwise block"
    elif op in ("Conv", "ConvTranspose"):
        kind = "conv"
    else:
        kind = "dense"
    return f"{kind}: {activation}"


def _reduced(layer: dict) -> bool:
    return layer["width_after"] < layer["width_before"]


def _exact(layer: dict) -> str:
    """README "Exactness": "exact" when every merge only changes float rounding, "approx"
    otherwise, "-" for a layer that kept its width."""
    if not _reduced(layer):
        return "-"
    return "exact" if layer["exact"] else "approx"


REFIT, BLOCK = "refit", "block"


def layer_error(layer: dict) -> tuple[str, str | None]:
    """The layer's error as a cell and where it comes from: with data, the largest calibration
    error of its refit consumers (`calibration_err_refit`, relative squared error); else its
    block error (`block_error.max_rel_err`, on random probes). "-" for a layer not reduced."""
    if not _reduced(layer):
        return "-", None
    refit = [r["calibration_err_refit"] for r in layer.get("refit") or [] if r.get("refit")]
    if refit:
        return f"{max(refit):.3g}", REFIT
    block = layer.get("block_error")
    if block is not None and block.get("max_rel_err") is not None:
        return f"{block['max_rel_err']:.3g}", BLOCK
    return "-", None


def _error_note(sources: set) -> str:
    """A footnote saying what the Error column measured."""
    notes = {
        REFIT: "with data, the largest calibration error of a refit consumer (calibration_err_refit: "
        "squared error relative to the output energy)",
        BLOCK: "the block error (block_error.max_rel_err: max |after - before| / max |before| of the "
        "first consumer's output, on random probes)",
    }
    said = [notes[s] for s in (REFIT, BLOCK) if s in sources]
    return f"\nError: {'; else '.join(said)}" if said else ""


def _method_line(report: dict) -> str:
    if "method" not in report:
        return ""
    damping = f" (damping {report['obs_damping']:g})" if "obs_damping" in report else ""
    return f"\nMethod: {report['method']}{damping}"


def _allocation_lines(report: dict) -> str:
    """The global allocation's steps: the widths tried, predicted and measured error or the kept
    fraction, and which were within the budget."""
    allocation = report.get("allocation")
    if not allocation:
        return ""
    measured = allocation["by"] == "max_error"
    rows = [("Step", "Widths", "Predicted err", "Measured err" if measured else "Kept", "Within")]
    for number, step in enumerate(allocation["steps"], 1):
        widths = " ".join(str(w) for w in step["widths"].values())
        rows.append(
            (
                str(number),
                widths,
                f"{step['predicted_error']:.3g}",
                f"{step['value']:.4g}",
                "yes" if step["accepted"] else "no",
            )
        )
    chosen = " ".join(f"{name}={w}" for name, w in allocation["widths"].items())
    head = f"\n\nWidths chosen per layer for {allocation['by']} {allocation['requested']:g}: {chosen}\n"
    return head + _table(rows)


def _width_change(before: int, after: int) -> str:
    """'1280 -> 640 (50%)': the fraction of the width kept shows a layer cut too far."""
    kept = 100.0 * after / before if before else 100.0
    return f"{before} -> {after} ({kept:.0f}%)" if kept >= 1 else f"{before} -> {after} ({kept:.1g}%)"


def format_inspect_table(info: dict) -> str:
    thresholds = info["thresholds"]
    # the weight's name next to the node's: exporters name nodes `node_Conv_295`; both select a layer
    rows = [("Layer", "Weight", "Activation", "Width") + tuple(f"@{t:g}" for t in thresholds)]
    for layer in info["layers"]:
        rows.append(
            (layer["name"], layer.get("weight", "-"), _activation(layer), str(layer["width"]))
            + tuple(str(layer["widths"][str(t)]) for t in thresholds)
        )
    return (
        _table(rows)
        + _group_lines(info.get("groups", []), info.get("groups_summary"))
        + _skipped_lines(info["skipped"])
    )


def _activation(layer: dict) -> str:
    """A coupled group's row says it is one: "residual group: Relu"."""
    op = layer.get("op", "")
    return f"{op}: {layer['activation']}" if op.endswith(" group") else layer["activation"]


def _group_lines(groups: list[dict], summary: dict | None) -> str:
    """One line per coupled channel group (kind, width, producers, why it is left alone) and the
    channel counts: single-producer layers against coupled groups."""
    coupled = [g for g in groups if g["kind"] != "layer"]
    if not coupled:
        return ""
    lines = [f"\nChannel groups ({len(coupled)}):"]
    for group in coupled:
        producers = ", ".join(m["producer"] for m in group["members"])
        why = "merged as one group" if group["reducible"] else group["reason"]
        lines.append(f"  {group['kind']}, {group['width']} channels: {producers}: {why}")
    if summary:
        lines.append(
            f"  channels: {summary['layer_channels']} in {summary['layers']} single-producer layers, "
            f"{summary['coupled_channels']} in {summary['coupled_groups']} coupled groups "
            f"({summary['coupled_channels_ready']} in {summary['coupled_groups_ready']} mergeable groups)"
        )
    return "\n".join(lines)


def _skipped_lines(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    lines = [f"\nSkipped ({len(skipped)}):"] + [f"  {s['name']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def _warning_lines(warnings: list[str]) -> str:
    """Degraded paths taken (shape inference failed, a fallback): numbers may be less complete."""
    if not warnings:
        return ""
    return "\n".join([f"\nWarnings ({len(warnings)}):"] + [f"  {w}" for w in warnings])


def _change(before: int, after: int, fmt=lambda n: f"{n:,}") -> str:
    pct = 100.0 * (after - before) / before if before else 0.0
    return f"{fmt(before)} -> {fmt(after)} ({pct:+.1f}%)"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[tuple], footer_from: int | None = None) -> str:
    """`rows[0]` is the header; rows from `footer_from` on (totals) sit below a rule. Plain ASCII
    text, no colours or markup, whatever the terminal: grep-able in a log, the same in a pipe."""
    table = Table(box=box.ASCII2, show_edge=True, highlight=False, pad_edge=True)
    for header in rows[0]:
        table.add_column(Text(str(header)), no_wrap=True, overflow="ignore")
    for i, row in enumerate(rows[1:], 1):
        table.add_row(*(Text(str(cell)) for cell in row), end_section=i + 1 == footer_from)
    console = Console(
        file=io.StringIO(), width=100_000, color_system=None, force_terminal=False, emoji=False, markup=False
    )
    with console.capture() as capture:
        console.print(table)
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


def format_verify_table(verify: dict) -> str:
    """Per-output errors, cosine, and top-1 agreement / accuracy where they apply."""
    rows = [
        (
            "Output",
            "Max abs err",
            "Max rel err",
            "Max elem rel",
            "Cosine",
            "NaN/Inf",
            "Top-1 agree",
            "Acc orig",
            "Acc reduced",
        )
    ]
    for name, out in verify["outputs"].items():
        rows.append(
            (
                name,
                f"{out['max_abs_err']:.3g}",
                f"{out['max_rel_err']:.3g}",
                f"{out['max_elem_rel_err']:.3g}",
                f"{out['cosine']:.6f}",
                str(out["nonfinite"]),
                _pct(out.get("top1_agreement")),
                _pct(out.get("accuracy_original")),
                _pct(out.get("accuracy_reduced")),
            )
        )
    return _table(rows) + f"\n(ONNX Runtime, {_verified_on(verify)})"


def _verified_on(verify: dict) -> str:
    """What the models ran on, in words."""
    runs, rows = verify["runs"], verify.get("rows")
    if verify["inputs"] == "held-out data":
        return (
            f"verified on {rows} held-out rows not used for calibration ({verify['calibration_rows']} "
            f"calibrated), {runs} batches"
        )
    if verify["inputs"] == "data":
        return f"{rows} rows of data in {runs} batches" if rows is not None else f"{runs} batches of data"
    return f"{runs} random draws"


def format_bench_table(bench: dict) -> str:
    rows = [("Model", "Params", "MACs", "File size", "Median ms", "IQR ms", "Speedup", "Ideal")]
    for entry in bench["models"]:
        ideal = entry.get("ideal_speedup")
        rows.append(
            (
                entry["model"],
                f"{entry['params']:,}",
                f"{entry['macs']:,}",
                _bytes(entry["file_size"]),
                f"{entry['median_ms']:.4f}",
                f"{entry['iqr_ms']:.4f}",
                f"{entry['speedup']:.2f}x",
                f"{ideal:.2f}x" if ideal else "-",
            )
        )
    fed = ", ".join(
        f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in bench["inputs"].items()
    )
    return _table(rows) + (
        f"\n(inputs {fed}; {bench['threads']} thread(s), "
        f"{bench['runs']} interleaved runs after {bench['warmup']} warm-up)"
    )


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
