"""The three trained models of `compare_pruning.py`, each a task dict with its data and metric.

- mlp: the shipped DRM19 methane surrogate (examples/drm19_mlp.onnx, 23-256-128-64-23, ReLU);
  calibration = the first 1000 states of examples/drm19_states.npz, evaluation = the other 1000;
  task metric = MSE against the true rates.
- cnn: a small CNN (3 conv + BN + ReLU, global pooling, linear head) trained here on scikit-learn's
  digits (8x8 images that ship with the package); calibration = 300 training images, evaluation =
  the 597 test images; task metric = accuracy.
- mobilenet: a small MobileNetV2-style CNN trained here on the same digits split: a 3x3 stem, three
  inverted-residual blocks (1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1
  project -> BN, expansion 4) *without* the residual Add, a 1x1 conv to 128 channels, global
  pooling and a linear head (29k parameters, 20 epochs of Adam, about a minute on two cores).
  Chosen over a GELU MLP on the DRM19 states because it has more reducible layers: `cg.inspect`
  finds 8 (the stem, each block's expand layer through the depthwise conv, each projection - the
  Add would tie it to the block input and make it irreducible - and the last 1x1), against 3 for a
  23-256-256-128-23 GELU MLP, and it exercises the depthwise path and conv consumers that the two
  other models do not.

A task dict: `name` (the graph input), `onnx`, `torch` (the same weights, for Torch-Pruning),
`calib` / `eval` (arrays), `metric` (name, function of the outputs), `higher_is_better` (of the
metric), `example` (a torch input), `prunable` (module name -> module, the producers Torch-Pruning
cuts; the ONNX layer names end in these module names).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch_models import conv_bn_relu6

HERE = Path(__file__).resolve().parent


def run(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})[0]


def export(module: nn.Module, example: torch.Tensor, name: str) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[name],
            dynamic_axes={name: {0: "batch"}},
        )
        return onnx.load(str(path))


def prunable(net: nn.Module, kinds=(nn.Linear, nn.Conv2d), last: str | None = None) -> dict[str, nn.Module]:
    """The dense convs / linears of `net` by module name, depthwise convs and `last` left out."""
    return {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, kinds) and getattr(m, "groups", 1) == 1 and name != last
    }


# ---- mlp: the shipped DRM19 surrogate ----------------------------------------------------------


def mlp_task() -> dict:
    model = onnx.load(str(HERE.parent / "examples/drm19_mlp.onnx"))
    data = np.load(HERE.parent / "examples/drm19_states.npz")
    weights = {
        t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer
    }
    net = nn.Sequential(
        nn.Linear(23, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 23),
    )
    net.load_state_dict(weights)
    x, y = data["state"], data["rate"]
    return dict(
        name="state",
        onnx=model,
        torch=net.eval(),
        calib=x[:1000],
        eval=x[1000:],
        metric=("held-out MSE", lambda out: float(np.mean((out - y[1000:]) ** 2))),
        higher_is_better=False,
        prunable=prunable(net, last="6"),
        example=torch.from_numpy(x[:2]),
    )


# ---- the digits models ---------------------------------------------------------------------------


def digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    return images, digits.target, order[:1200], order[1200:]


def train_classifier(net: nn.Module, images, labels, train, epochs: int, lr: float = 3e-3) -> nn.Module:
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    xs, ys = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xs[batch]), ys[batch]).backward()
            optimizer.step()
    return net.eval()


def digits_task(net: nn.Module, epochs: int) -> dict:
    images, labels, train, test = digits_split()
    torch.manual_seed(0)
    net = train_classifier(net(), images, labels, train, epochs)
    example = torch.from_numpy(images[:2])
    return dict(
        name="x",
        onnx=export(net, example, "x"),
        torch=net,
        calib=images[train[:300]],
        eval=images[test],
        metric=("accuracy", lambda out: float(np.mean(out.argmax(1) == labels[test]))),
        higher_is_better=True,
        prunable=prunable(net, last="head"),
        example=example,
    )


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def inverted_block(inp: int, out: int, expand: int, stride: int) -> nn.Sequential:
    """MobileNetV2's inverted residual block without the residual Add."""
    hidden = inp * expand
    return nn.Sequential(
        conv_bn_relu6(inp, hidden, kernel=1),
        conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
        nn.Conv2d(hidden, out, 1, bias=False),
        nn.BatchNorm2d(out),
    )


class DigitsMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(1, 16),
            inverted_block(16, 24, 4, 1),
            inverted_block(24, 32, 4, 2),
            inverted_block(32, 48, 4, 1),
            conv_bn_relu6(48, 128, kernel=1),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def cnn_task() -> dict:
    return digits_task(DigitsCNN, epochs=40)


def mobilenet_task() -> dict:
    return digits_task(DigitsMobileNet, epochs=20)


TASKS = {"mlp": mlp_task, "cnn": cnn_task, "mobilenet": mobilenet_task}
