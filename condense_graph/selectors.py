"""Selection rules: which neurons of a layer merge, and with which factors. Pure numpy.

A rule is a `Selector` (like Torch-Pruning's `Importance`): `select(rows, target)` looks at the
layer's candidate channels (`Rows`, built the same way for dense, conv and depthwise layers by
`condense_graph.plan`) and returns a `Selection`: the groups (main neuron first), the factors the
consumers absorb them with, and whether the data-free merge may be exact. A rule declares what it
needs, so nothing is computed for nothing: `needs_calibration` (the channels' activation Gram
matrix, `Rows.gram`), `needs_consumer_statistics` (each consumer's input-feature Gram and weights,
`Rows.terms`), `needs_width` (it selects at a width only, no threshold).

Four rules ship, registered by name (the API's `method=`, the CLI's `--method`; "auto" is `obs`
with calibration data and `condense` without):
  condense     the paper's cosine of weight vectors (eq. 4, 8-9, greedy grouping of 2.2.3);
  activations  the cosine of calibration activations, least-squares factors;
  magnitude    the pruning baseline: keep the largest-norm neurons, merge nothing;
  obs          exact merges of positive multiples, then greedy structured Optimal Brain Surgeon
               on the consumers' input statistics (then the pass refits the consumers).
Adding a rule is one `@register` class here (or anywhere: the registry is all the rest reads).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import ClassVar

import numpy as np

from condense_graph.errors import CondenseError
from condense_graph.refit import activation_cosine, feature_indices, projection_factors
from condense_graph.similarity import (
    constant_agreement,
    greedy_groups,
    groups_for_width,
    neuron_similarity,
    round_up_groups,
    split_to_width,
)

DEFAULT = "condense"  # the paper's rule: the rule without calibration data
AUTO = "auto"  # structured OBS with calibration data, the paper's rule without
ALIASES = {"weights": DEFAULT}  # the names of the deprecated `similarity=` / `--similarity`
OBS_DAMPING = 1e-3  # structured OBS damps a Hessian by this times its mean diagonal


@dataclass
class Grouping:
    """The target of a selection: a threshold, or the threshold landing on a width."""

    threshold: float = 0.95
    round_to: int = 1
    width: int | None = None

    def __call__(self, cosine: np.ndarray) -> tuple[list[np.ndarray], float]:
        """The groups (main neuron first) and the threshold that produced them."""
        if self.width is not None:
            return groups_for_width(cosine, max(self.width, 1))
        groups = greedy_groups(cosine, self.threshold)
        if self.round_to > 1:
            groups = round_up_groups(cosine, groups, self.round_to)
        return groups, self.threshold


@dataclass
class Rows:
    """A layer's candidate channels (not dead, not alone), as every selector sees them.

    `vectors` are what a merge is measured on (their norms give eq. 10's factors): a dense or conv
    layer's neuron vectors [w, b], a depthwise block's depthwise vectors (eq. 40, 52). `parallel`
    lists the vector sets that must all be parallel for two channels to group: [vectors] for a
    dense or conv layer, [depthwise vectors, expand rows] for a depthwise block (paper A.3)."""

    vectors: np.ndarray  # [n, d]
    parallel: list[np.ndarray]  # [n, d_i] each
    constants: list[np.ndarray] = field(default_factory=list)  # [n] each: constants inside g
    gram: np.ndarray | None = None  # [n, n] Gram matrix of the channels' calibration activations
    terms: list | None = None  # per consumer: `obs.ConsumerTerm` over the candidates' features

    def __len__(self) -> int:
        return len(self.vectors)


@dataclass
class Selection:
    """Groups of candidate indices (main neuron first), the threshold that made them (None:
    pruning), the similarity reported as `min_group_cosine` (None: not a cosine), the merge
    factors of the candidates ([n], measured on what the consumers read; None: eq. 10's norm
    ratios through the post-activation affine ops) and whether the data-free merge may be exact."""

    groups: list[np.ndarray]
    threshold: float | None
    cosine: np.ndarray | None = None
    factors: np.ndarray | None = None
    merges_exactly: bool = False
    # predicted relative output error at each width the rule passed through (OBS: width -> cost)
    costs: dict[int, float] | None = None


class Selector(ABC):
    """A selection rule. `blocks`: whether it groups depthwise blocks itself (then it must return
    no factors: a block's factors are eq. 48's); otherwise they are grouped by the paper's A.3 rule."""

    name: ClassVar[str]
    label: ClassVar[str]  # how messages name it
    needs_calibration: ClassVar[bool] = False
    needs_consumer_statistics: ClassVar[bool] = False  # `Rows.terms` too (implies calibration)
    needs_width: ClassVar[bool] = False
    blocks: ClassVar[bool] = True

    @abstractmethod
    def select(self, rows: Rows, target: Grouping) -> Selection: ...

    def for_layer(self, depthwise: bool) -> Selector:
        """The selector that groups such a layer."""
        return self if self.blocks or not depthwise else SELECTORS[DEFAULT]

    def data_free(self) -> Selector:
        """The selector standing in for this one where no calibration data is at hand (the width
        search of `target_params`): the paper's rule for rules that need data."""
        return SELECTORS[DEFAULT] if self.needs_calibration else self


SELECTORS: dict[str, Selector] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make the rule available by its `name` (API, CLI)."""
    SELECTORS[cls.name] = cls()
    return cls


def names() -> list[str]:
    """The registered rules' names (the API's `method=`, the CLI's `--method`, after "auto")."""
    return list(SELECTORS)


def method_names() -> list[str]:
    return [AUTO] + names()


def get_selector(name: str) -> Selector:
    name = ALIASES.get(name, name)
    if name not in SELECTORS:
        quoted = [f"'{n}'" for n in method_names()]
        raise CondenseError(f"method must be {', '.join(quoted[:-1])} or {quoted[-1]}, got {name!r}")
    return SELECTORS[name]


def choose(method: str | Selector, with_data: bool) -> Selector:
    """The rule `method` names; "auto" is structured OBS with calibration data, else the paper's."""
    if isinstance(method, Selector):
        return method
    if method == AUTO:
        return SELECTORS["obs" if with_data else DEFAULT]
    return get_selector(method)


@register
class WeightCosine(Selector):
    """The paper: min over `rows.parallel` of the cosines of [w, b] and of w (`neuron_similarity`),
    and of the agreement of the constants inside the activation; norm-ratio factors."""

    name = DEFAULT
    label = "the paper's merge"

    def select(self, rows: Rows, target: Grouping) -> Selection:
        cosine = reduce(np.minimum, [neuron_similarity(v.astype(np.float32)) for v in rows.parallel])
        groups, threshold = target(np.minimum(cosine, constant_agreement(rows.constants, len(rows))))
        return Selection(groups, threshold, cosine, merges_exactly=True)


@register
class ActivationCosine(Selector):
    """The cosine of the channels' calibration activations; factor <a_k, a_main> / <a_main, a_main>
    (any activation; depthwise blocks keep the paper's rule)."""

    name = "activations"
    label = "activation similarity"
    needs_calibration = True
    blocks = False

    def select(self, rows: Rows, target: Grouping) -> Selection:
        cosine = activation_cosine(rows.gram)
        groups, threshold = target(cosine)
        return Selection(groups, threshold, cosine, projection_factors(rows.gram, groups))


@register
class Magnitude(Selector):
    """Magnitude pruning (Torch-Pruning's MagnitudeImportance, p=2): the `target.width` neurons
    with the largest L2 norm of `rows.vectors`, each alone; the others are dropped, not merged."""

    name = "magnitude"
    label = "magnitude pruning"
    needs_width = True

    def select(self, rows: Rows, target: Grouping) -> Selection:
        return Selection(largest(rows.vectors, target.width), None)


def largest(vectors: np.ndarray, width: int) -> list[np.ndarray]:
    """The `width` rows of largest L2 norm, each alone, in index order."""
    order = np.argsort(-np.linalg.norm(vectors.astype(np.float64), axis=1), kind="stable")
    return [np.array([k]) for k in sorted(order[:width])]


EXACT = Grouping(threshold=1.0)  # positive multiples to float rounding (`COSINE_TOLERANCE`)


@register
class StructuredOBS(Selector):
    """Exact merges first, then greedy structured Optimal Brain Surgeon (`condense_graph.obs`).

    1. Channels that are exact positive multiples merge by the paper's rule (eq. 10, threshold 1):
       exact, and OBS under damping would not keep them so.
    2. The groups' main channels are ranked by the OBS cost of removing them from every consumer
       (the consumers' input-feature Gram matrices, damped by `damping` * mean diagonal; costs
       summed over consumers), and the cheapest go until `target.width` groups are left. Without a
       width, the width is what the paper's rule gives at `target.threshold`: same size, chosen
       and compensated by the data.
    The consumers are then refit toward the original network's outputs (`compensate`), which
    folds each removed channel's contribution into the kept ones by least squares: eq. 10 when it
    is an exact multiple. Factors stay eq. 10's (None): removed channels are dropped, not merged."""

    name = "obs"
    label = "structured OBS"
    needs_calibration = True
    needs_consumer_statistics = True

    def __init__(self, damping: float = OBS_DAMPING):
        self.damping = damping

    def select(self, rows: Rows, target: Grouping) -> Selection:
        exact = SELECTORS[DEFAULT].select(rows, EXACT)
        width = target.width if target.width is not None else self.paper_width(rows, target)
        n = len(exact.groups)
        if width >= n:  # exact merges alone are enough; split some to land on the width (round_to)
            groups = split_to_width(exact.cosine, exact.groups, width)
            return replace(exact, groups=groups, threshold=None, costs={len(groups): 0.0})
        order = self.removal_order(rows, exact.groups, width)
        kept = [exact.groups[i] for i in order.kept(width)]
        costs = {w: order.relative_cost(w) for w in range(width, n + 1)}
        return Selection(kept, None, exact.cosine, merges_exactly=False, costs=costs)

    @staticmethod
    def paper_width(rows: Rows, target: Grouping) -> int:
        return len(SELECTORS[DEFAULT].select(rows, target).groups)

    def removal_order(self, rows: Rows, groups: list[np.ndarray], floor: int):
        """The OBS removal order of the groups, each seen as its main channel with the others'
        consumer weights folded in (factor <a_k, a_main> / <a_main, a_main>: exact multiples)."""
        from condense_graph.obs import removal_order

        factors = projection_factors(rows.gram, groups)
        terms = [fold_groups(term, groups, factors) for term in rows.terms]
        return removal_order(terms, floor=floor, damping=self.damping)


def fold_groups(term, groups: list[np.ndarray], factors: np.ndarray):
    """`term` over the groups' main channels: each main's weight rows plus factor * its members'
    (what the consumer reads once the group is merged), the Hessian restricted to the mains."""
    from condense_graph.obs import ConsumerTerm

    block = term.block
    weights = term.weights.astype(np.float64)
    features = len(weights) - 1
    blocks = weights[:-1].reshape(features // block, block, -1)
    folded = np.stack([np.tensordot(factors[g], blocks[g], axes=1) for g in groups])
    keep = feature_indices([g[0] for g in groups], block, features)
    merged = np.concatenate([folded.reshape(-1, weights.shape[1]), weights[-1:]])
    return ConsumerTerm(term.hessian[np.ix_(keep, keep)], merged, block)
