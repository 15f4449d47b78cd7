"""reduce_module: export, condense, rebuild the nn.Module (MLP, CNN, MobileNetV2; both exporters)."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from condense_graph.errors import CondenseError

torch = pytest.importorskip("torch")
from test_mobilenet import copy_channel  # noqa: E402
from torch import nn  # noqa: E402
from torch_models import MobileNetV2, randomize_batchnorm  # noqa: E402

from condense_graph.torch_module import ReducedModule, reduce_module  # noqa: E402

EXPORTERS = ["torchscript", "dynamo"]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x))


class OwnLinear(nn.Module):
    """A layer of its own holding a weight the pass reduces: it cannot be rebuilt."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def planted_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        for q in (10, 11, 12):  # layer 1: 20 -> 17
            mlp[0].weight[q], mlp[0].bias[q] = mlp[0].weight[1], mlp[0].bias[1]
        for q in (7, 8):  # layer 2: 12 -> 10
            mlp[2].weight[q], mlp[2].bias[q] = mlp[2].weight[0], mlp[2].bias[0]
    return mlp, torch.randn(8, 6), [17, 10]


def planted_cnn():
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    randomize_batchnorm(cnn, torch.Generator().manual_seed(0))
    (conv1, bn1, _), (conv2, bn2, _) = cnn.features[0], cnn.features[1]
    for q in (5, 6, 7):
        copy_channel(1, q, conv1, bn1)
    for q in (10, 11):
        copy_channel(2, q, conv2, bn2)
    return cnn, torch.randn(4, 3, 12, 12), [13, 14]


def planted_mobilenet():
    torch.manual_seed(0)
    net = MobileNetV2().eval()
    randomize_batchnorm(net, torch.Generator().manual_seed(0))
    stem, first_dw = net.features[0], net.features[1].conv[0]
    for q in (20, 21):  # the stem and the depthwise conv it feeds
        copy_channel(2, q, stem[0], stem[1], dw=first_dw[0], dw_bn=first_dw[1])
    head = net.features[18]
    for q in range(100, 140):
        copy_channel(3, q, head[0], head[1])
    return net, torch.randn(2, 3, 32, 32), None


NETS = {"mlp": planted_mlp, "cnn": planted_cnn, "mobilenet": planted_mobilenet}
_CACHE = {}


def net(name):
    if name not in _CACHE:
        _CACHE[name] = NETS[name]()
    return _CACHE[name]


def onnx_outputs(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_close(got, expected):
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(got - expected))) <= 1e-5 * scale, (np.max(np.abs(got - expected)), scale)


def out_width(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def check_reduced(result, module, x):
    """Outputs equal the reduced ONNX model's, widths are the report's, it trains."""
    assert isinstance(result, ReducedModule) and not result.module.training
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # not the export's inputs
    with torch.no_grad():
        assert_close(result.module(x2).numpy(), onnx_outputs(result.onnx_model, x2))
    layers = result.report["torch"]["layers"]
    assert len(layers) == len(result.report["layers"])
    for layer in result.report["layers"]:
        assert out_width(result.module.get_submodule(layers[layer["name"]])) == layer["width_after"]
    old = {name: p.shape for name, p in module.named_parameters()}
    new = {name: p.shape for name, p in result.module.named_parameters()}
    assert all(new[name].numel() <= shape.numel() for name, shape in old.items())
    assert sum(p.numel() for p in result.module.parameters()) < sum(p.numel() for p in module.parameters())
    trained = copy.deepcopy(result.module).train()  # the result stays as reduced
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = trained(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[1] != losses[0]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(NETS))
def test_planted_duplicates_round_trip(name, exporter):
    module, x, widths = net(name)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    result = reduce_module(module, x, exporter=exporter, threshold=0.9999)
    reduced = [
        layer["width_after"]
        for layer in result.report["layers"]
        if layer["width_after"] < layer["width_before"]
    ]
    if widths is not None:
        assert reduced == widths
    else:  # the stem 32 -> 30 (with its depthwise conv), the head 1280 -> 1240
        assert reduced == [30, 1240]
        assert result.module.features[1].conv[0][0].groups == 30
        assert result.module.features[1].conv[0][0].weight.shape == (30, 1, 3, 3)
    check_reduced(result, module, x)
    with torch.no_grad():  # exact merges: the original network's outputs too
        assert_close(result.module(x).numpy(), module(x).numpy())
    assert {n: p.shape for n, p in module.named_parameters()} == shapes  # the input is not modified


# MobileNetV2 at target_params=0.6 takes condense's width allocation minutes on a shared CPU:
# a width per layer instead (the stem, an expand conv past its planted copies, the head)
MOBILENET_WIDTHS = {"features.0.0.weight": 24, "features.4.conv.0.0.weight": 100, "features.18.0.weight": 900}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(NETS))
def test_width_target_round_trip(name, exporter, tmp_path):
    module, x, _ = net(name)
    path = tmp_path / "r.onnx"
    if name == "mobilenet":
        result = reduce_module(module, x, exporter=exporter, onnx_path=path, layer_widths=MOBILENET_WIDTHS)
        modules = result.report["torch"]["layers"]
        widths = {
            modules[layer["name"]] + ".weight": layer["width_after"] for layer in result.report["layers"]
        }
        assert {name: widths[name] for name in MOBILENET_WIDTHS} == MOBILENET_WIDTHS
        assert result.report["torch"]["biases_added"]  # the merges gave bias-free convs a bias
    else:
        result = reduce_module(module, x, exporter=exporter, onnx_path=path, target_params=0.6)
        assert result.report["params_after"] < 0.7 * result.report["params_before"]
    assert result.onnx_path == path
    assert onnx.load(str(path)).graph.node  # the file is the reduced model
    check_reduced(result, module, x)


def test_layer_widths_by_parameter_name():
    module, x, _ = net("mlp")
    result = reduce_module(module, x, layer_widths={"0.weight": 8, "2.weight": 5})
    assert (result.module[0].out_features, result.module[2].in_features, result.module[2].out_features) == (
        8,
        8,
        5,
    )
    assert result.module[4].in_features == 5
    check_reduced(result, module, x)


def test_a_layer_of_its_own_is_refused():
    torch.manual_seed(0)
    module = nn.Sequential(OwnLinear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        module[0].weight[5], module[0].bias[5] = module[0].weight[0], module[0].bias[0]
    with pytest.raises(CondenseError, match=r"'0\.weight' belongs to a OwnLinear, which cannot be rebuilt"):
        reduce_module(module, torch.randn(4, 6), threshold=0.9999)


def test_unknown_exporter_is_refused():
    module, x, _ = net("mlp")
    with pytest.raises(CondenseError, match="exporter must be one of torchscript, dynamo"):
        reduce_module(module, x, exporter="jit")


def test_the_module_is_also_condense_graph_torch():
    import condense_graph.torch as cgt
    from condense_graph import torch_module

    assert cgt.reduce_module is torch_module.reduce_module and cgt.ReducedModule is torch_module.ReducedModule
