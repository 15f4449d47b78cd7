"""Write benchmark sections into benchmarks/RESULTS.md, each under the machine that measured it."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; measured {date.today().isoformat()}"
    )


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section `key` of RESULTS.md."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nWritten by the scripts in this folder; "
        "rerun them to refresh a section.\n"
    )
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = f"{begin}\n## {title}\n\nMachine: {machine_description()}\n\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    RESULTS.write_text(text)
