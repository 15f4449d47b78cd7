"""What every pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    details: dict = field(default_factory=dict)
