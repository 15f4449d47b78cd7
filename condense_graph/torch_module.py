"""Round trip to PyTorch: export a module, condense the ONNX graph, rebuild the module smaller.

`reduce_module(module, example_inputs, exporter=..., **condense_options)` exports `module` (a
copy, in eval mode) to ONNX, runs `condense_graph.condense` on it (the one implementation of the
merges) and copies every initializer the pass changed back into a deep copy of the module, by the
parameter names the exporter keeps, fixing the owning layers' widths (nn.Linear, nn.Conv1d/2d,
depthwise included, nn.BatchNorm1d/2d). The result is an `nn.Module` of the reduced widths,
ready to train, its outputs those of the reduced ONNX model.

Exporter settings, chosen so that every initializer is a parameter of that name and value:
- "torchscript" (opset 17): `do_constant_folding=False`, or the exporter folds each eval-mode
  BatchNorm into its conv (weights renamed `onnx::Conv_N`); its initializer de-duplication
  (equal tensors, e.g. fresh BatchNorms, become Identity nodes of one) is undone here.
- "dynamo" (opset 18): `optimize=False`, as its optimizer also folds BatchNorm into the conv,
  keeping the conv's weight name for the folded values; the constants are then folded here
  without the rewrite rules, leaving every node that reads a parameter alone.

A changed tensor that maps to no parameter, or to a layer of another kind, raises CondenseError
naming it; so does a rebuilt module whose outputs differ from the reduced ONNX model's.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from condense_graph.errors import CondenseError

EXPORTERS = ("torchscript", "dynamo")
CHECK_RTOL = 1e-4  # the rebuilt module's outputs against the reduced ONNX model's, relative to max |y|


@dataclass
class ReducedModule:
    """What `reduce_module` returns.

    Attributes:
        module (nn.Module): the rebuilt module of the reduced widths (eval mode; a new object: an
            optimizer built on the original's parameters does not train it).
        onnx_model (onnx.ModelProto): the reduced ONNX model.
        report (dict): condense's report, plus `torch`: the exporter, `layers` (each reduced
            layer's node name to the module holding its weight), the tensors `replaced`, the
            `biases_added`, the modules `resized` ([old, new] in/out widths), the `shape_constants`
            left to the module's own code, and the rebuild check on the example inputs
            (`max_abs_diff`, `max_abs_output`).
        onnx_path (Path | None): where the reduced ONNX model was written, when asked.
    """

    module: object
    onnx_model: onnx.ModelProto
    report: dict
    onnx_path: Path | None = field(default=None)


def reduce_module(
    module, example_inputs, *, exporter: str = "torchscript", onnx_path=None, **condense_options
):
    """Export `module`, condense the graph and rebuild the module with the reduced weights.

    Args:
        module (torch.nn.Module): the network (not modified; a deep copy is exported and rebuilt).
        example_inputs (torch.Tensor | tuple): the inputs for export (and for the rebuild check).
        exporter (str, default "torchscript"): "torchscript" (dynamo=False, opset 17) or "dynamo"
            (opset 18).
        onnx_path (str | os.PathLike | None): where to write the reduced ONNX model.
        **condense_options: passed to `condense_graph.condense` (threshold, layer_widths,
            target_params, calibration, method...); calibration arrays are named after the graph
            inputs: "x" for one input, "x0", "x1"... for several.

    Returns:
        ReducedModule: the module, the reduced ONNX model, the report.

    Raises:
        CondenseError: an unknown exporter; a tensor the pass changed that no parameter of a
            supported layer holds; a rebuilt module whose outputs differ from the ONNX model's.
    """
    import torch

    from condense_graph import condense

    if exporter not in EXPORTERS:
        raise CondenseError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    rebuilt = copy.deepcopy(module).eval()
    with torch.no_grad():
        original = _export(rebuilt, inputs, exporter)
    _check_exported_values(original, rebuilt)
    result = condense(original, **condense_options)
    summary = _rebuild(rebuilt, original, result.model)
    summary["exporter"] = exporter
    summary["layers"] = _layer_modules(result.report, result.model, _state(rebuilt))
    summary.update(_check_outputs(rebuilt, result.model, inputs))
    report = dict(result.report)
    report["torch"] = summary
    path = None
    if onnx_path is not None:
        path = Path(onnx_path)
        onnx.save(result.model, str(path))
    return ReducedModule(module=rebuilt.eval(), onnx_model=result.model, report=report, onnx_path=path)


def export_module(module, example_inputs, exporter: str = "torchscript") -> onnx.ModelProto:
    """The ONNX model `reduce_module` condenses: a copy of `module` in eval mode, exported with
    the settings of the module docstring (parameters keep their names as initializers)."""
    import torch

    if exporter not in EXPORTERS:
        raise CondenseError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with torch.no_grad():
        return _export(copy.deepcopy(module).eval(), inputs, exporter)


def _names(inputs, stem: str) -> list[str]:
    return [stem] if len(inputs) == 1 else [f"{stem}{i}" for i in range(len(inputs))]


def _export(module, inputs, exporter: str) -> onnx.ModelProto:
    import torch

    with torch.no_grad():
        outputs = module(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    input_names, output_names = _names(inputs, "x"), _names(range(n_out), "y")
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamo=False,
                opset_version=17,
                export_params=True,
                keep_initializers_as_inputs=False,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.EVAL,
            )
            model = onnx.load(str(path))
            _undo_deduplication(model, module)
            return model
        program = torch.onnx.export(
            module,
            inputs,
            input_names=input_names,
            output_names=output_names,
            dynamo=True,
            opset_version=18,
            optimize=False,
            verbose=False,
        )
        _fold_constants(program.model, set(module.state_dict()))
        return program.model_proto


def _undo_deduplication(model: onnx.ModelProto, module) -> None:
    """The TorchScript exporter keeps one of equal parameters and feeds the others through
    Identity nodes named after them: give each its own initializer back."""
    state = set(module.state_dict())
    inits = {init.name: init for init in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in inits
            and node.output[0] in state
            and node.output[0] not in inits
        ):
            init = copy.deepcopy(inits[node.input[0]])
            init.name = node.output[0]
            model.graph.initializer.append(init)
            inits[init.name] = init
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _fold_constants(ir_model, parameters: set[str]) -> None:
    """Fold the dynamo graph's constants (shape arithmetic, the zero bias of a bias-free conv)
    without its rewrite rules, leaving every node that reads a parameter as it is."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import _constant_folding

    def should_fold(node):
        if node.op_type in ("Shape", "Size"):
            return None
        if any(value is not None and value.name in parameters for value in node.inputs):
            return False
        return None

    _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        should_fold=should_fold,
    )(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)


def _state(module) -> dict:
    return {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()}


def _check_exported_values(model: onnx.ModelProto, module) -> None:
    """Every initializer named after a parameter must hold its values (no exporter folding)."""
    state = _state(module)
    for init in model.graph.initializer:
        if init.name in state:
            tensor = state[init.name].detach().cpu().numpy()
            array = numpy_helper.to_array(init)
            if array.shape != tensor.shape or not np.array_equal(array, tensor):
                raise CondenseError(
                    f"the exporter changed the values of '{init.name}' (a folded layer?): "
                    "its weights cannot be mapped back to the module"
                )


def _owner(module, name: str):
    prefix, _, attr = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attr


def _rebuild(module, original: onnx.ModelProto, reduced: onnx.ModelProto) -> dict:
    """Copy the changed initializers into `module`, fix the layers' widths; a summary."""
    before, after = _tensors(original), _tensors(reduced)
    state = _state(module)
    changed: dict[str, np.ndarray] = {}
    shapes: list[str] = []
    for name in before:
        if name in state and name not in after:
            raise CondenseError(f"the reduced model no longer holds '{name}': it cannot be mapped back")
    for name, array in after.items():
        old = before.get(name)
        if old is not None and old.shape == array.shape and np.array_equal(old, array):
            continue
        if name not in state and _is_shape(name, array, reduced):
            shapes.append(name)  # the module computes its own shapes: the output check tells
            continue
        target = name if name in state else _bias_slot(name, reduced, state)
        if target is None:
            reason = "a new initializer" if old is None else "an initializer the exporter made"
            raise CondenseError(
                f"the reduced tensor '{name}' ({reason}) is no parameter of the module and feeds no "
                "layer's bias: it cannot be mapped back"
            )
        if target not in state and not np.any(array):
            continue  # the zero bias the dynamo exporter gives a bias-free conv: none needed
        changed[target] = array
    import torch

    added, layers = [], {}
    for name, array in changed.items():
        owner, attr = _owner(module, name)
        _check_supported(owner, name)
        old = getattr(owner, attr, None)
        reference = old if old is not None else owner.weight
        tensor = torch.from_numpy(np.array(array, copy=True)).to(
            dtype=reference.dtype, device=reference.device
        )
        if old is None:
            added.append(name)
            owner.bias = torch.nn.Parameter(tensor)
        elif isinstance(old, torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = tensor
        prefix = name.rpartition(".")[0]
        layers[prefix] = owner
    resized = {}
    for prefix, owner in layers.items():
        before_width = _width(owner)
        _fix_attributes(owner, prefix)
        if _width(owner) != before_width:
            resized[prefix or "<root>"] = [list(before_width), list(_width(owner))]
    return {"replaced": sorted(changed), "biases_added": added, "resized": resized, "shape_constants": shapes}


SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}


def _is_shape(name: str, array: np.ndarray, model: onnx.ModelProto) -> bool:
    """Whether `name` is an integer tensor read only as a shape (Reshape's target...)."""
    if array.dtype.kind not in "iu":
        return False
    uses = [
        (node.op_type, i) for node in model.graph.node for i, value in enumerate(node.input) if value == name
    ]
    return bool(uses) and all(SHAPE_INPUTS.get(op) == i for op, i in uses)


def _layer_modules(report: dict, model: onnx.ModelProto, state: dict) -> dict[str, str]:
    """Each reduced layer of the report (its node name) to the module holding its weight."""
    weights = {node.name: node.input[1] for node in model.graph.node if len(node.input) > 1}
    found = {}
    for layer in report.get("layers", []):
        weight = weights.get(layer.get("name"))
        if weight in state:
            found[layer["name"]] = weight.rpartition(".")[0]
    return found


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The main graph's initializers and Constant node values, by name."""
    tensors = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    tensors.update((init.name, numpy_helper.to_array(init)) for init in model.graph.initializer)
    return tensors


def _bias_slot(name: str, model: onnx.ModelProto, state: dict) -> str | None:
    """The bias parameter of the Conv/Gemm whose bias input `name` is, its weight a parameter."""
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] == name:
            weight = node.input[1]
            if weight in state and weight.endswith(".weight"):
                return weight[: -len("weight")] + "bias"
    return None


def _supported():
    from torch import nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _check_supported(owner, name: str) -> None:
    if type(owner) not in _supported():
        raise CondenseError(
            f"the reduced tensor '{name}' belongs to a {type(owner).__name__}, which cannot be rebuilt "
            "(Linear, Conv1d/2d and BatchNorm1d/2d can)"
        )


def _width(owner) -> tuple:
    from torch import nn

    if isinstance(owner, nn.Linear):
        return (owner.in_features, owner.out_features)
    if isinstance(owner, (nn.Conv1d, nn.Conv2d)):
        return (owner.in_channels, owner.out_channels, owner.groups)
    return (owner.num_features,)


def _fix_attributes(owner, prefix: str) -> None:
    from torch import nn

    where = prefix or "the module"
    if isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = owner.weight.shape
        _check_length(owner.bias, owner.out_features, where)
    elif isinstance(owner, (nn.Conv1d, nn.Conv2d)):
        out, per_group = owner.weight.shape[:2]
        depthwise = owner.groups > 1 and owner.groups == owner.in_channels == owner.out_channels
        if depthwise:
            if per_group != 1:
                raise CondenseError(f"depthwise conv '{where}' got a kernel of {per_group} inputs per group")
            owner.in_channels = owner.out_channels = owner.groups = out
        elif owner.groups == 1:
            owner.out_channels, owner.in_channels = out, per_group
        elif out != owner.out_channels or per_group * owner.groups != owner.in_channels:
            raise CondenseError(f"grouped conv '{where}' ({owner.groups} groups) cannot change its width")
        _check_length(owner.bias, owner.out_channels, where)
    else:
        owner.num_features = (
            owner.weight.shape[0] if owner.weight is not None else owner.running_mean.shape[0]
        )
        for tensor in (owner.bias, owner.running_mean, owner.running_var):
            _check_length(tensor, owner.num_features, where)


def _check_length(tensor, n: int, where: str) -> None:
    if tensor is not None and tensor.shape[0] != n:
        raise CondenseError(f"'{where}' was reduced inconsistently: {tuple(tensor.shape)} for width {n}")


def _check_outputs(module, model: onnx.ModelProto, inputs) -> dict:
    """Run the rebuilt module and the reduced model (ONNX Runtime) on the example inputs."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, inputs, strict=False)}
    expected = session.run(None, feeds)
    try:
        with torch.no_grad():
            got = module.eval()(*inputs)
    except RuntimeError as error:
        raise CondenseError(
            f"the rebuilt module fails on the example inputs (a width fixed in its code?): {error}"
        ) from error
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    if len(got) != len(expected):
        raise CondenseError(f"the rebuilt module gives {len(got)} outputs, the ONNX model {len(expected)}")
    diff = max(
        float(np.max(np.abs(g.detach().cpu().numpy() - e))) for g, e in zip(got, expected, strict=True)
    )
    scale = max(float(np.max(np.abs(e))) for e in expected)
    if diff > CHECK_RTOL * max(scale, 1e-12):
        raise CondenseError(
            f"the rebuilt module's outputs differ from the reduced ONNX model's by {diff:.3g} "
            f"(max |y| {scale:.3g}): a layer it cannot rebuild?"
        )
    return {"max_abs_diff": diff, "max_abs_output": scale}
