"""The pass contract, in the spirit of onnx-ir's `PassBase`.

A pass is called on an `onnx.ModelProto` and returns a `PassResult`: the new model and whether it
differs from the input. A pass never modifies its input (`in_place` is False for every pass here):
it works on an imported copy and exports a new model. Passes with more to say return a subclass
of `PassResult` with typed fields (`passes.condense_channels.CondenseChannelsResult`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


class PassBase(ABC):
    """`pass_(model) -> PassResult`; subclasses implement `call`. The input is never modified."""

    in_place: ClassVar[bool] = False  # onnx-ir's flag: no pass here edits the model it is given

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.call(model)

    @abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult: ...
