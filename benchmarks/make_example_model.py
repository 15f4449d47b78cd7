"""Regenerate the example model shipped in ``examples/``: a DRM19 methane chemistry surrogate.

What it builds
--------------
``drm19_mlp.onnx``
    A ReLU MLP 23-256-128-64-23 (plain Gemm + Relu nodes, opset 17), the small cousin of the
    23-3200-1600-800-400-23 network of the condensation-reduction paper (section 3.1). Input
    ``state`` [batch, 23] is the standardized thermochemical state [T, P, BoxCox(Y_1..Y_21)];
    output ``rate`` [batch, 23] is the standardized change of that transformed state over a
    fixed step dt = 1e-6 s, divided by dt. It is initialized as the paper's eq. 19 says
    (N(0, ((m_in + m_out)/2)^-2), zero biases): that small initialization puts training in the
    condensed regime, so many hidden neurons end up pointing in the same direction, which is
    what ``condense-graph`` merges.
``drm19_states.npz``
    2000 held-out samples: ``state`` (the ONNX input, same name) and ``rate`` (the target), both
    standardized float32, plus ``input_mean``/``input_std``/``target_mean``/``target_std`` (training
    set statistics), ``feature_names``, ``dt`` and ``boxcox_lambda`` so a user can undo the
    preprocessing: raw = x * std + mean; d(state)/dt = rate * target_std + target_mean.

Data provenance
---------------
Thermochemical states are computed with Cantera from the DRM19 mechanism (21 species, 84
reactions; Kazakov & Frenklach, Penn State 1994, a reduction of GRI-Mech 1.2), the mechanism of
the paper's combustion experiment. Constant-pressure (1 atm) ignition of methane/air is run over a
grid of initial temperatures and equivalence ratios; states are sampled along each trajectory,
densely around ignition, and each is paired with the state dt later on the same trajectory.
Preprocessing follows the DNN-for-combustion-chemistry literature the paper cites [XY+24]:
Box-Cox transform (lambda = 0.1) of the mass fractions, target = change of the transformed
state divided by dt, inputs and targets standardized with training-set mean/std.

Rerun
-----
    python benchmarks/make_example_model.py                    # writes examples/*.{onnx,npz}
    python benchmarks/make_example_model.py --out-dir /tmp/ex --steps 4000 --seed 1

The mechanism is looked up at ``../shared/data/drm19.yaml`` next to the repository
(``--mechanism`` overrides). Runs in a few minutes on 2 CPU cores; the run is seeded, but exact
bits may differ across torch/Cantera versions and thread counts.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings
from pathlib import Path

import cantera as ct
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MECHANISM = Path(__file__).resolve().parents[2] / "shared/data/drm19.yaml"

PRESSURE = ct.one_atm
DT = 1e-6  # surrogate time step [s], as in the paper's combustion task
BOXCOX_LAMBDA = 0.1
INITIAL_TEMPERATURES = np.linspace(1100.0, 1600.0, 8)  # [K]
EQUIVALENCE_RATIOS = np.linspace(0.6, 1.4, 7)
SAMPLES_PER_TRAJECTORY = 700  # 56 trajectories -> ~39k samples
N_HELD_OUT = 2000
VALIDATION_FRACTION = 0.1
HIDDEN_SIZES = (256, 128, 64)
BATCH_SIZE = 1024
INPUT_NAME, OUTPUT_NAME = "state", "rate"
# CVODE tolerances: tight because the targets are differences over a tiny dt.
RTOL, ATOL = 1e-10, 1e-16


# ----------------------------------------------------------------------------- data


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_reactor(gas: ct.Solution, temperature: float, phi: float):
    """A fresh methane/air constant-pressure reactor and its network."""
    gas.TP = temperature, PRESSURE
    gas.set_equivalence_ratio(phi, "CH4", "O2:1.0, N2:3.76")
    reactor = ct.IdealGasConstPressureReactor(gas, clone=True)
    net = ct.ReactorNet([reactor])
    net.rtol, net.atol = RTOL, ATOL
    return reactor, net


def ignition_delay(gas: ct.Solution, temperature: float, phi: float) -> float:
    """Time of the steepest temperature rise, found with the integrator's own steps."""
    reactor, net = make_reactor(gas, temperature, phi)
    times, temps = [], []
    while net.time < 10.0:
        net.step()
        times.append(net.time)
        temps.append(reactor.T)
        # Stop well after the temperature has jumped: the steepest rise is then behind us.
        if reactor.T > temperature + 400.0:
            t_ign = times[int(np.argmax(np.gradient(temps, times)))]
            if net.time > 1.5 * t_ign:
                return t_ign
    raise RuntimeError(f"no ignition within 10 s at T0={temperature} K, phi={phi}")


def sample_times(t_ign: float, n: int) -> np.ndarray:
    """Sample times on [0, 3 t_ign], dense around ignition where the state changes fastest.

    A cubic map of a uniform grid clusters points at t_ign; a minimum spacing of 2 dt keeps the
    pairs (t, t + dt) in increasing order for a single forward integration.
    """
    u = np.linspace(-1.0, 1.0, n + 1)[1:]  # skip t = 0: radicals are exactly zero there
    times = t_ign * (1.0 + u**3 * np.where(u < 0.0, 1.0, 2.0))
    for k in range(1, n):
        times[k] = max(times[k], times[k - 1] + 2.0 * DT)
    return times


def trajectory_pairs(gas: ct.Solution, temperature: float, phi: float, n: int):
    """States [T, P, Y] at the sample times and dt later, along one ignition trajectory."""
    t_ign = ignition_delay(gas, temperature, phi)
    reactor, net = make_reactor(gas, temperature, phi)
    now, later = [], []
    # Record the nominal pressure: the reactor holds it only up to roundoff, and roundoff / dt
    # would turn the (physically zero) pressure target into unlearnable noise.
    for t in sample_times(t_ign, n):
        net.advance(t)
        now.append(np.r_[reactor.T, PRESSURE, reactor.Y])
        net.advance(t + DT)
        later.append(np.r_[reactor.T, PRESSURE, reactor.Y])
    return np.array(now), np.array(later)


def generate_states(mechanism: Path):
    gas = ct.Solution(str(mechanism))
    now, later = [], []
    for temperature in INITIAL_TEMPERATURES:
        t0 = time.perf_counter()
        for phi in EQUIVALENCE_RATIOS:
            a, b = trajectory_pairs(gas, temperature, phi, SAMPLES_PER_TRAJECTORY)
            now.append(a)
            later.append(b)
        print(
            f"  T0={temperature:6.1f} K: {len(EQUIVALENCE_RATIOS)} trajectories "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    names = ["T", "P", *gas.species_names]
    return np.concatenate(now), np.concatenate(later), names


def boxcox(y: np.ndarray) -> np.ndarray:
    # Clip the integrator's tiny negative mass fractions; Box-Cox needs y >= 0.
    return (np.clip(y, 0.0, None) ** BOXCOX_LAMBDA - 1.0) / BOXCOX_LAMBDA


def transform(states: np.ndarray) -> np.ndarray:
    return np.concatenate([states[:, :2], boxcox(states[:, 2:])], axis=1)


def features(now: np.ndarray, later: np.ndarray):
    """Unstandardized inputs [T, P, BC(Y)] and targets d[T, P, BC(Y)]/dt."""
    x = transform(now)
    return x, (transform(later) - x) / DT


def fit_standardizer(a: np.ndarray):
    mean, std = a.mean(axis=0), a.std(axis=0)
    # Constant columns (P; the changes of P and of the inert N2 and AR) would divide by ~0:
    # leave them unscaled, so they stay ~0 instead of blowing roundoff up to unit variance.
    std = np.where(std > 1e-9 * std.max(), std, 1.0)
    return mean, std


def split(n: int, rng: np.random.Generator):
    """Random held-out / validation / training index sets."""
    perm = rng.permutation(n)
    n_val = int(VALIDATION_FRACTION * n)
    return perm[:N_HELD_OUT], perm[N_HELD_OUT : N_HELD_OUT + n_val], perm[N_HELD_OUT + n_val :]


# ----------------------------------------------------------------------------- model


def build_model(n_features: int) -> nn.Sequential:
    sizes = (n_features, *HIDDEN_SIZES, n_features)
    layers: list[nn.Module] = []
    for m_in, m_out in zip(sizes[:-1], sizes[1:], strict=True):
        linear = nn.Linear(m_in, m_out)
        # Paper eq. 19: N(0, var), var = ((m_in + m_out)/2)^-2. This is much smaller than the
        # default init and is what drives neurons to condense early in training.
        nn.init.normal_(linear.weight, mean=0.0, std=2.0 / (m_in + m_out))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # linear output layer


def model_shape(model: nn.Sequential) -> str:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return "-".join(str(n) for n in [linears[0].in_features, *(m.out_features for m in linears)])


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.mse_loss(model(x), y).item()


def train(model, x_train, y_train, x_val, y_val, steps: int, lr: float, seed: int):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Halve the learning rate five times over the run (the paper halves it every 1000 steps).
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 6), gamma=0.5)
    generator = torch.Generator().manual_seed(seed)
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_train), (BATCH_SIZE,), generator=generator)
        loss = nn.functional.mse_loss(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % report_every == 0 or step == steps:
            print(
                f"  step {step:6d}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"train MSE {mse(model, x_train, y_train):.4f}  "
                f"val MSE {mse(model, x_val, y_val):.4f}",
                flush=True,
            )


# ----------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript exporter (dynamo=False) writes a flat Gemm/Relu graph, the form
    # condense-graph works on.
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose: don't nag
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_onnx_matches(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    err = float(np.abs(got - want).max())
    if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
        raise AssertionError(f"onnxruntime differs from torch by up to {err:.2e}")
    return err


def greedy_group_count(w: np.ndarray, b: np.ndarray, threshold: float) -> int:
    """Groups of neurons whose [w | b] rows have cosine >= threshold, formed greedily.

    A quick look at how condensed a layer is: repeatedly take the ungrouped neuron with the
    most ungrouped neighbours above the threshold as a new group with those neighbours.
    """
    v = np.concatenate([w, b[:, None]], axis=1)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    close = (v @ v.T) >= threshold
    ungrouped = np.ones(len(v), dtype=bool)
    groups = 0
    while ungrouped.any():
        counts = (close & ungrouped[None, :]).sum(axis=1)
        counts[~ungrouped] = -1
        leader = int(np.argmax(counts))
        ungrouped &= ~close[leader]
        ungrouped[leader] = False
        groups += 1
    return groups


def print_condensation(model: nn.Sequential, thresholds=(0.9, 0.95, 0.99)) -> None:
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for i, layer in enumerate(hidden, start=1):
        w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        counts = ", ".join(f"{t}: {greedy_group_count(w, b, t)}" for t in thresholds)
        print(f"  hidden layer {i} ({len(w)} neurons) -> groups at {counts}")


# ----------------------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "examples")
    p.add_argument("--mechanism", type=Path, default=DEFAULT_MECHANISM)
    p.add_argument("--steps", type=int, default=6000, help="training steps (batches of 1024)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    seed_everything(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    print(f"generating states with {args.mechanism}", flush=True)
    now, later, names = generate_states(args.mechanism)
    x_raw, y_raw = features(now, later)
    held, val, tr = split(len(x_raw), np.random.default_rng(args.seed))
    x_mean, x_std = fit_standardizer(x_raw[tr])
    y_mean, y_std = fit_standardizer(y_raw[tr])
    x = ((x_raw - x_mean) / x_std).astype(np.float32)
    y = ((y_raw - y_mean) / y_std).astype(np.float32)
    print(
        f"{len(x)} samples: {len(tr)} train, {len(val)} validation, {len(held)} held out "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    model = build_model(x.shape[1])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {model_shape(model)} ({n_params} parameters) for {args.steps} steps", flush=True)

    def t(idx):
        return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])

    train(model, *t(tr), *t(val), steps=args.steps, lr=args.lr, seed=args.seed)
    model.eval()

    onnx_path = args.out_dir / "drm19_mlp.onnx"
    npz_path = args.out_dir / "drm19_states.npz"
    export_onnx(model, torch.from_numpy(x[held[:8]]), onnx_path)
    err = check_onnx_matches(model, onnx_path, torch.from_numpy(x[held]))
    np.savez_compressed(
        npz_path,
        **{INPUT_NAME: x[held], OUTPUT_NAME: y[held]},
        input_mean=x_mean,
        input_std=x_std,
        target_mean=y_mean,
        target_std=y_std,
        feature_names=np.array(names),
        dt=np.float64(DT),
        boxcox_lambda=np.float64(BOXCOX_LAMBDA),
    )

    print(f"held-out MSE {mse(model, *t(held)):.4f}; onnxruntime max |diff| vs torch {err:.1e}")
    print("condensation (greedy cosine groups of [W | b] rows):")
    print_condensation(model)
    for path in (onnx_path, npz_path):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
