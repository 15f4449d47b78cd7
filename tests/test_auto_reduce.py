"""The automatic reduction loop (`condense_graph.auto_reduce`, paper section 2.4.2 / 3.2.2): the
schedules of eq. (21)-(25) as numbers, the targets' moves, and the loop itself on a small CNN on
scikit-learn's digits: it reduces, retrains, rolls back when a criterion fails, and ends smaller
and meeting its final criterion."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

from condense_graph.auto_reduce import (  # noqa: E402
    Cosine,
    Criteria,
    ErrorBudget,
    LoopConfig,
    Thresholds,
    Widths,
    threshold_cut,
)
from condense_graph.errors import CondenseError  # noqa: E402
from condense_graph.torch import auto_reduce, export_module  # noqa: E402

# -- eq. (21)-(25)


def test_eq21_learning_rate_is_periodic_cosine():
    lr = Cosine(0.01, 0.0001, 200, hold=False)  # the paper's lr_max, lr_min, T_lr
    assert lr(0) == pytest.approx(0.01)
    assert lr(100) == pytest.approx(0.0001 + 0.5 * 0.0099)
    assert lr(200) == pytest.approx(0.0001)
    assert lr(300) == pytest.approx(lr(100))  # eq. (21) has no case split: the cosine goes on
    assert lr(50) == pytest.approx(0.0001 + 0.5 * 0.0099 * (1 + math.cos(math.pi / 4)))


def test_eq22_criterion_relaxes_then_holds():
    main = Criteria().main  # Acc_max 0.88, Acc_min 0.85, T_Acc 100
    assert main(0) == pytest.approx(0.88)
    assert main(50) == pytest.approx(0.865)
    assert main(99) > 0.85
    assert main(100) == main(250) == 0.85
    layer = Criteria().layer
    assert (layer(0), layer(100)) == (pytest.approx(0.84), pytest.approx(0.81))
    # section 3.2.3: after the first main reduction's 16 reductions the main criterion was 0.87837,
    # after the second's (32 in all) 0.87343: t_reduction 15 and 31 (the loop's `t`, kept - 1)
    assert main(15) == pytest.approx(0.87837, abs=5e-6)
    assert main(31) == pytest.approx(0.87343, abs=5e-6)
    assert layer(15) == pytest.approx(0.83837, abs=5e-6)


def test_eq23_to_25_thresholds():
    assert threshold_cut(0) == pytest.approx(0.88080, abs=1e-5)  # eq. (23), the paper's 0.88080
    assert threshold_cut(1) == pytest.approx(1 / (1 + math.exp(-2.1)))  # eq. (24)
    target = Thresholds()
    assert target.value("a", {}) == pytest.approx(0.8808, abs=1e-4)
    target.failed("a")
    target.failed("a")
    assert target.value("a", {}) == pytest.approx(1 / (1 + math.exp(-2.2)))
    assert target.value("b", {}) == pytest.approx(threshold_cut(0))  # per layer
    target.too_small("a")  # eq. (25): t_fail - 1
    assert target.value("a", {}) == pytest.approx(threshold_cut(1))
    target.too_small("b")
    assert target.value("b", {}) < threshold_cut(0)  # below eq. (23)'s value
    opts = target.options("a", {})
    assert opts == {"threshold": 1.0, "layer_thresholds": {"a": target.value("a", {})}}


def test_criteria_loss_levels_and_nan():
    c = Criteria.for_loss(0.02)
    assert c.met(0.02, c.main(0)) and not c.met(0.0201, c.main(0))
    assert c.layer(0) == pytest.approx(0.022) and c.layer(100) == pytest.approx(0.024)
    assert not c.met(float("nan"), 1e9)  # a NaN loss never meets a criterion
    assert not Criteria().met(float("nan"), -1.0)
    assert c.best(0.01, float("nan")) and not c.best(float("nan"), 0.01)


def test_widths_and_error_budget_targets_move():
    w = Widths({"a": 10})
    assert w.value("a", {"a": 40}) == 10
    w.failed("a")
    assert w.value("a", {"a": 40}) == 25  # halfway back to the current width
    assert Widths(0.5).value("b", {"b": 9}) == 4
    with pytest.raises(CondenseError):
        Widths(1.5)
    e = ErrorBudget(0.1, {"x": np.zeros((4, 2), np.float32)})
    e.failed("a")
    assert e.value("a", {}) == pytest.approx(0.05)
    for _ in range(5):
        e.too_small("a")
    assert e.value("a", {}) == pytest.approx(0.4)  # capped at 4x
    opts = e.options("a", {"a": 8, "b": 6})
    assert opts["layer_widths"] == {"b": 6} and opts["max_error"] == pytest.approx(0.4)


# -- the loop on digits


def paper_init(module, generator):
    """Eq. (20): N(0, ((m_in + m_out)/2)^-2), the small initialization under which neurons
    condense (with PyTorch's default initialization few merge at the paper's 0.8808)."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            per_out = m.weight[0].numel()
            per_in = m.weight.shape[0] * (m.weight[0, 0].numel() if m.weight.dim() > 2 else 1)
            std = 2.0 / (per_out + per_in)
            with torch.no_grad():
                m.weight.normal_(0.0, std, generator=generator)
                m.bias.normal_(0.0, std, generator=generator)


def digits_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(24 * 16, 48),
        torch.nn.ReLU(),
        torch.nn.Linear(48, 10),
    )


@pytest.fixture(scope="module")
def digits():
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x[:1400], torch.tensor(y[:1400]), x[1400:], torch.tensor(y[1400:])


def task(digits, seed=0):
    x_train, y_train, x_val, y_val = digits
    generator = torch.Generator().manual_seed(seed)

    def train_step(module, optimizer):
        idx = torch.randint(0, len(x_train), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(module(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def evaluate(module):
        return (module(x_val).argmax(1) == y_val).float().mean().item()

    return train_step, evaluate


def trained_cnn(digits, steps=150):
    torch.manual_seed(0)
    module = digits_cnn()
    paper_init(module, torch.Generator().manual_seed(0))
    train_step, _ = task(digits, seed=1)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(steps):
        train_step(module, optimizer)
    return module.eval()


CRITERIA = Criteria(
    main=Cosine(0.87, 0.85, 100), layer=Cosine(0.83, 0.81, 100), last_layer=0.8, deviation=0.3, final=0.85
)
CONFIG = LoopConfig(lr=Cosine(3e-3, 1e-4, 200, hold=False), layer_steps=40, max_main=2, main_steps=200)


def ort_outputs(module, x):
    model = export_module(module, torch.zeros(len(x), 1, 8, 8))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def test_loop_reduces_retrains_and_meets_the_final_criterion(digits, tmp_path):
    module = trained_cnn(digits)
    before = [p.detach().clone() for p in module.parameters()]
    train_step, evaluate = task(digits)
    log_path = tmp_path / "loop.json"
    result = auto_reduce(
        module,
        train_step,
        evaluate,
        CRITERIA,
        example_inputs=torch.zeros(1, 1, 8, 8),
        config=CONFIG,
        log_path=log_path,
        quiet=True,
    )
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # input untouched
    kept = [e for e in result.log if e["event"] == "accept"]
    assert kept, "no reduction was kept"
    assert result.params < 0.8 * result.original_params
    assert result.final_met and result.metric >= 0.85
    assert evaluate(result.module.eval()) == pytest.approx(result.metric)
    # every kept reduction met its level, after at least min_layer_steps of retraining
    for e in kept:
        assert e["metric"] >= e["level"]
    # the log on disk is the log returned, and parameter counts only go down at reductions
    on_disk = json.loads(log_path.read_text())
    assert on_disk["events"] == json.loads(json.dumps(result.log))
    assert on_disk["original_params"] == result.original_params
    # the result is a working module of the reduced widths: its ONNX export runs to its outputs
    x = digits[2][:16]
    with torch.no_grad():
        expected = result.module.eval()(x).numpy()
    np.testing.assert_allclose(ort_outputs(result.module, x), expected, rtol=1e-4, atol=1e-5)
    shapes = {name: tuple(p.shape) for name, p in result.module.named_parameters()}
    assert shapes["0.weight"][0] < 16 or shapes["2.weight"][0] < 24 or shapes["6.weight"][0] < 48


def test_loop_rolls_back_and_raises_the_threshold_when_a_criterion_fails(digits):
    """A threshold far too low (base -3: 0.047) merges nearly every neuron: the layer criterion
    fails (or the deviation rule fires), the loop goes back to its save point and tries again
    with a raised threshold (slope 2 per failure), until a reduction is kept."""
    module = trained_cnn(digits)
    train_step, evaluate = task(digits)
    config = LoopConfig(
        lr=Cosine(3e-3, 1e-4, 200, hold=False), layer_steps=10, max_main=1, main_steps=200, max_attempts=8
    )
    result = auto_reduce(
        module,
        train_step,
        evaluate,
        CRITERIA,
        example_inputs=torch.zeros(1, 1, 8, 8),
        target=Thresholds(base=-3.0, slope=2.0),
        config=config,
        quiet=True,
    )
    events = result.log
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert rollbacks, "the strict criterion never failed"
    first = rollbacks[0]
    reduce_before = [e for e in events[: events.index(first)] if e["event"] == "reduce"][-1]
    assert first["params"] == reduce_before["params_before"]  # back at the save point's size
    assert first["reason"] in ("limit", "deviation")
    missed = CRITERIA.deviation if first["reason"] == "deviation" else first["level"]
    assert not CRITERIA.met(first["metric"], missed)
    # the retried reduction of that layer used a higher threshold
    retry = [
        e for e in events[events.index(first) :] if e["event"] == "reduce" and e["layer"] == first["layer"]
    ]
    assert retry and retry[0]["value"] > reduce_before["value"]
    # a failure for the limit (not a deviation) raised the step limit for good (+10 per failure)
    limit_fails = sum(1 for e in rollbacks if e["reason"] == "limit")
    trained = [e["trained"] for e in events if e["event"] == "evaluate" and e["phase"] == "layer"]
    assert max(trained) <= config.layer_steps + 10 * limit_fails
    assert [e for e in events if e["event"] == "accept"]
    assert result.params < result.original_params


def test_deviation_rule_rolls_back_after_deviation_steps(digits):
    """A deviation criterion no net meets (accuracy >= 1.01), and layer criteria not met within
    deviation_steps, roll every reduction back after exactly deviation_steps of retraining."""
    module = trained_cnn(digits)
    train_step, evaluate = task(digits)
    criteria = Criteria(
        main=Cosine(0.87, 0.85, 100), layer=Cosine(0.99, 0.99, 1), last_layer=0.99, deviation=1.01
    )
    config = LoopConfig(layer_steps=20, deviation_steps=3, max_main=1, main_steps=200, max_attempts=2)
    result = auto_reduce(
        module,
        train_step,
        evaluate,
        criteria,
        example_inputs=torch.zeros(1, 1, 8, 8),
        config=config,
        quiet=True,
    )
    rollbacks = [e for e in result.log if e["event"] == "rollback"]
    assert rollbacks and all(e["reason"] == "deviation" for e in rollbacks)
    assert not [e for e in result.log if e["event"] == "accept"]
    assert result.params == result.original_params  # every reduction undone
    layer_evals = [e["trained"] for e in result.log if e["event"] == "evaluate" and e["phase"] == "layer"]
    assert max(layer_evals) == 3
    assert [e for e in result.log if e["event"] == "give_up"]


def test_loop_plot_is_written(digits, tmp_path):
    pytest.importorskip("matplotlib")
    from condense_graph.plots import plot_loop

    module = trained_cnn(digits, steps=100)
    train_step, evaluate = task(digits)
    config = LoopConfig(layer_steps=20, max_main=1, main_steps=100)
    result = auto_reduce(
        module,
        train_step,
        evaluate,
        Criteria(main=Cosine(0.5, 0.5, 1), layer=Cosine(0.5, 0.5, 1), last_layer=0.5),
        example_inputs=torch.zeros(1, 1, 8, 8),
        config=config,
        quiet=True,
    )
    path = plot_loop(result.log, tmp_path / "fig6.png", "accuracy")
    assert path.stat().st_size > 10_000
    with pytest.raises(CondenseError):
        plot_loop([], tmp_path / "empty.png")
