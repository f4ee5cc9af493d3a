"""PFEC - Pruning Filters for Efficient ConvNets (Li et al., ICLR 2017; methods.md section 1).

One-shot hard pruning by the L1 norm of each filter: `pfec_masks` prunes, in every chosen
layer, all but ``int(N * (1 - p))`` filters (the kept count is floored: ``selection``
rounding ``'pfec'``), the lowest-L1 ones (ties to the lower index). The `PFEC` method applies
it at ``init`` (``masks == hard``, every slice of the pruned channels zeroed; the train
step's ``hard_masked`` clears their optimizer moments); the pruner's ``update`` and ``finalize`` leave the masks as they are, so training is
the fine-tuning (retraining) phase.

Layer numbering (`layer_numbers`): every convolution counts, from 1 at the stem, in forward
order, except the 1x1 projection shortcuts (modules named ``.../downsample``), which PFEC's
ResNet-34 skip list shows are not numbered (it skips only even layers = first convs). In a
basic-block ResNet (CIFAR, ImageNet ResNet-18/34) the first conv of block ``b`` (0-based over
all blocks) is thus layer ``2b + 2`` and the second ``2b + 3``; VGG's ``convI`` is layer ``I``.
A stage-rate config applies the rate of a layer's stage (stage ``s`` ends at layer
``stage_ends[s]``) to the FIRST conv of each residual block (modules ``.../conv1``), minus the
skipped layers. ResNet-34-C prunes the residual group of stage 3 (the projection conv
``layer3_0/downsample`` and, with the same indices, the second convs that add to it): that needs
``residual='coupled'``, where the graph holds them in one group; a ValueError says so otherwise.

Counting convention of Table 1 (`table1_cost`), established by tests/test_pfec.py:
FLOPs = MACs of conv and FC layers (``flops.count(..., convention='conv_fc')``); params =
weights of conv and FC layers plus FC biases, BatchNorm scale/shift NOT counted. This matches
every absolute figure of Table 1 (dense and pruned VGG-16, ResNet-56, ResNet-110), e.g.
ResNet-110 1.72e6 params (1.73e6 when BN is counted). Three printed percentages differ from
this convention in the last digit, the paper being lower: ResNet-56-B params 13.77% (paper
13.7), ResNet-110-B FLOPs 38.66% (paper 38.6) and params 32.45% (paper 32.4). No other
rounding rule, stage boundary, BN convention or uniform per-stage kept count reproduces all
figures (see the test module's docstring); the FLOPs figures rule out the other roundings.

`sensitivity` prunes each listed layer alone at each rate (L1, the same rounding) and calls a
user evaluation function on the masked variables (all member slices zeroed: filters, BN
entries, next-layer inputs, so the model is the compacted one); `write_sensitivity_csv` and
`plot_sensitivity` (matplotlib, Agg canvas) save the table, as PFEC's Figure 2.
"""

from __future__ import annotations

import csv
import dataclasses
import numbers
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxprune import criteria, flops, validate
from jaxprune import selection as sel
from jaxprune.graph import PruningGraph
from jaxprune.masks import apply_masks, init_masks
from jaxprune.methods.sfp import harden, is_projection, subgraph
from jaxprune.pruner import (MaskState, Pruner, check_total_epochs, check_variables, next_count,
                             zero_count, zero_penalty)

SELECTIONS = ("independent", "greedy")
DEFAULT_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class PFECConfig:
    """Which layers PFEC prunes and by how much.

    Attributes:
      name: label.
      num_layers: number of numbered convs the model must have (None: not checked).
      stage_ends: last layer number of every stage but the last, e.g. ``(18, 36)``.
      stage_rates: per stage, the rate of the first conv of each residual block.
      layer_rates: explicit ``(layer number, rate)`` pairs (any conv).
      producer_rates: ``(module path, rate)`` pairs: that module's whole group.
      coupled: ``(module, module)`` pairs that must lie in one group (ResNet-34-C).
      skip: layer numbers never pruned (they override the rates above).
    """

    name: str
    num_layers: int | None = None
    stage_ends: tuple[int, ...] = ()
    stage_rates: tuple[float, ...] = ()
    layer_rates: tuple[tuple[int, float], ...] = ()
    producer_rates: tuple[tuple[str, float], ...] = ()
    coupled: tuple[tuple[str, str], ...] = ()
    skip: tuple[int, ...] = ()

    def __post_init__(self):
        for f in ("stage_ends", "stage_rates", "layer_rates", "producer_rates", "coupled", "skip"):
            object.__setattr__(self, f, tuple(tuple(v) if isinstance(v, list) else v
                                              for v in getattr(self, f)))
        for r in self.stage_rates:
            validate.rate(r, f"PFEC config {self.name!r}: stage rate")
        for layer, r in self.layer_rates:
            _check_layer(layer, self.name)
            validate.rate(r, f"PFEC config {self.name!r}: rate of layer {layer}")
        for path, r in self.producer_rates:
            validate.rate(r, f"PFEC config {self.name!r}: rate of {path!r}")
        for layer in tuple(self.skip) + tuple(self.stage_ends):
            _check_layer(layer, self.name)
        if self.stage_rates and len(self.stage_rates) != len(self.stage_ends) + 1:
            raise ValueError(
                f"PFEC config {self.name!r}: {len(self.stage_rates)} stage rates need "
                f"{len(self.stage_rates) - 1} stage ends, got {self.stage_ends!r}")


def _check_layer(layer: Any, name: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
        raise ValueError(f"PFEC config {name!r}: layer numbers are ints >= 1, got {layer!r}")


_R34_SKIP = (2, 8, 14, 16, 26, 28, 30, 32)

PFEC_CONFIGS: dict[str, PFECConfig] = {
    "resnet56-A": PFECConfig("resnet56-A", 55, (18, 36), (0.1, 0.1, 0.1), skip=(16, 20, 38, 54)),
    "resnet56-B": PFECConfig("resnet56-B", 55, (18, 36), (0.6, 0.3, 0.1),
                             skip=(16, 18, 20, 34, 38, 54)),
    "resnet110-A": PFECConfig("resnet110-A", 109, (36, 72), (0.5, 0.0, 0.0), skip=(36,)),
    "resnet110-B": PFECConfig("resnet110-B", 109, (36, 72), (0.5, 0.4, 0.3), skip=(36, 38, 74)),
    "vgg16-A": PFECConfig("vgg16-A", 13,
                          layer_rates=tuple((i, 0.5) for i in (1, 8, 9, 10, 11, 12, 13))),
    "resnet34-A": PFECConfig("resnet34-A", 33, (7, 15, 27), (0.3, 0.3, 0.3, 0.0), skip=_R34_SKIP),
    "resnet34-B": PFECConfig("resnet34-B", 33, (7, 15, 27), (0.5, 0.6, 0.4, 0.0), skip=_R34_SKIP),
    "resnet34-C": PFECConfig("resnet34-C", 33, producer_rates=(("layer3_0/downsample", 0.2),),
                             coupled=(("layer3_0/downsample", "layer3_0/conv2"),)),
}


def get_config(config: str | PFECConfig) -> PFECConfig:
    """The named config (``PFEC_CONFIGS``), ``config`` itself, or a `PFECConfig` from a mapping
    of its fields (what a config file can hold, e.g. ``{'name': 'mine', 'stage_ends': (6, 12),
    'stage_rates': (0.5, 0.3, 0.1)}``)."""
    if isinstance(config, PFECConfig):
        return config
    if isinstance(config, str) and config in PFEC_CONFIGS:
        return PFEC_CONFIGS[config]
    fields = config.to_dict() if hasattr(config, "to_dict") else config
    if isinstance(fields, Mapping):
        try:
            return PFECConfig(**fields)
        except TypeError as e:
            raise ValueError(f"PFEC config {dict(fields)!r}: {e}") from None
    raise ValueError(f"unknown PFEC config {config!r}; allowed: {', '.join(PFEC_CONFIGS)} or a "
                     "mapping of PFECConfig fields")


def layer_numbers(graph: PruningGraph) -> dict[int, str]:
    """PFEC layer number -> conv module path (see the module docstring)."""
    seen: list[str] = []
    for op in graph.ops:
        if op.kind == "conv" and op.module and op.module not in seen and not is_projection(op.module):
            seen.append(op.module)
    return {i + 1: m for i, m in enumerate(seen)}


def _is_block_first(module: str) -> bool:
    return "/" in module and module.rsplit("/", 1)[-1] == "conv1"


def resolve(config: str | PFECConfig, graph: PruningGraph) -> dict[str, float]:
    """Group name -> pruning rate of ``config`` on ``graph`` (ValueError on a mismatch)."""
    cfg = get_config(config)
    numbering = layer_numbers(graph)
    count = len(numbering)
    if cfg.num_layers is not None and count != cfg.num_layers:
        raise ValueError(f"PFEC config {cfg.name!r} is for a model with {cfg.num_layers} "
                         f"numbered convs; this model has {count}")

    def check(layer: int) -> None:
        if layer not in numbering:
            raise ValueError(f"PFEC config {cfg.name!r}: layer {layer} does not exist; "
                             f"the model's convs are layers 1..{count}")

    for layer in cfg.skip:
        check(layer)
    skip = set(cfg.skip)
    by_layer: dict[int, float] = {}
    if cfg.stage_rates:
        for layer, module in numbering.items():
            if _is_block_first(module):
                stage = sum(layer > end for end in cfg.stage_ends)
                by_layer[layer] = cfg.stage_rates[stage]
    for layer, rate in cfg.layer_rates:
        check(layer)
        by_layer[layer] = rate
    p2g = graph.producer_to_group()
    out: dict[str, float] = {}

    def add(group: str, rate: float, what: str) -> None:
        if group in out and out[group] != rate:
            raise ValueError(f"PFEC config {cfg.name!r}: {what} shares group {group!r} with "
                             f"another pruned layer at a different rate")
        out[group] = rate

    for layer, rate in sorted(by_layer.items()):
        if layer in skip or rate == 0.0:
            continue
        module = numbering[layer]
        if module not in p2g:
            why = graph.unprunable.get(module, "not a prunable producer")
            raise ValueError(f"PFEC config {cfg.name!r}: layer {layer} ({module}) cannot be "
                             f"pruned: {why}")
        add(p2g[module], rate, f"layer {layer} ({module})")
    for module, rate in cfg.producer_rates:
        if module not in p2g:
            raise ValueError(f"PFEC config {cfg.name!r}: module {module!r} is not a prunable "
                             f"producer of this model")
        if rate:
            add(p2g[module], rate, f"module {module!r}")
    for a, b in cfg.coupled:
        if p2g.get(a) is None or p2g.get(a) != p2g.get(b):
            raise ValueError(
                f"PFEC config {cfg.name!r} prunes {a!r} and {b!r} with the same indices: trace "
                f"the model with residual='coupled' so that they share one group "
                f"(this graph uses residual={graph.residual!r})")
    return out


def pfec_masks(variables: Any, graph: PruningGraph, config: str | PFECConfig,
               criterion: str = "l1", selection: str = "independent",
               width: Any = None) -> dict[str, jax.Array]:
    """0/1 masks of the one-shot PFEC pruning of ``config`` (a name or a `PFECConfig`).

    ``selection='independent'`` scores every layer on its own weights (PFEC's default);
    ``'greedy'`` scores a layer without the input kernels of channels already pruned upstream
    (groups are visited in forward order). ``width``: a `jaxprune.selection.WidthPolicy` for
    the kept counts (default the paper's exact counts).
    """
    width = sel.as_width_policy(width)
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; allowed: {', '.join(SELECTIONS)}")
    rates = resolve(config, graph)
    fn = criteria.get_criterion(criterion)
    masks = init_masks(graph)
    if selection == "independent":
        scores = fn(variables, subgraph(graph, list(rates)))
        masks.update(sel.prune_by_rates(scores, rates, rounding="pfec", width=width))
        return masks
    for name in graph.groups:
        if name in rates:
            seen = apply_masks(variables, masks, graph, roles=("in",))
            scores = fn(seen, subgraph(graph, [name]))
            masks.update(sel.prune_by_rates(scores, {name: rates[name]}, rounding="pfec", width=width))
    return masks


# ----------------------------------------------------------------------------- Table 1 counting


def _is_norm_leaf(path: tuple[str, ...], siblings: set[str]) -> bool:
    return path[-1] in ("scale", "bias") and "scale" in siblings


def table1_cost(graph: PruningGraph, masks: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """``(FLOPs, params)`` with PFEC Table 1's convention (see the module docstring).

    FLOPs: conv + FC MACs; params: conv/FC weights and biases, normalisation (BN) scale and
    shift excluded. ``masks`` None is the dense model.
    """
    macs = flops.count(graph, masks, "conv_fc").macs
    keep = None if masks is None else {n: (np.asarray(m) != 0).astype(np.int64)
                                       for n, m in masks.items()}
    siblings: dict[tuple[str, ...], set[str]] = {}
    for leaf in graph.leaves:
        if leaf.is_param:
            siblings.setdefault(leaf.path[:-1], set()).add(leaf.path[-1])
    params = 0
    for leaf in graph.leaves:
        if not leaf.is_param or _is_norm_leaf(leaf.path, siblings[leaf.path[:-1]]):
            continue
        size = 1
        for f in leaf.factors:
            n = f.size if keep is None else f.fixed + sum(int(np.dot(per, keep[g]))
                                                          for g, per in f.per_channel)
            size *= n
        params += size
    return macs, params


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class PFEC:
    """One-shot PFEC pruning at ``init``; training afterwards is the retraining phase.

    ``PFEC(...).pruner(graph, total_epochs)`` is the method as a `jaxprune.pruner.Pruner` over
    a `jaxprune.pruner.MaskState`: ``init`` prunes (hard), ``update`` and ``finalize`` keep
    the masks.

    Attributes:
      config: a ``PFEC_CONFIGS`` name or a `PFECConfig`.
      criterion: 'l1' (PFEC) or any ``jaxprune.criteria`` name.
      selection: 'independent' or 'greedy'.
      width: a `jaxprune.selection.WidthPolicy` (or ``round_to`` int) for the kept counts.
    """

    config: Any = "resnet56-A"
    criterion: str = "l1"
    selection: str = "independent"
    width: Any = None
    name: str = "pfec"

    def __post_init__(self):
        object.__setattr__(self, "config", get_config(self.config))
        object.__setattr__(self, "width", sel.as_width_policy(self.width))
        criteria.get_criterion(self.criterion)
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; allowed: {', '.join(SELECTIONS)}")

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """This method as a `jaxprune.pruner.Pruner` over a `jaxprune.pruner.MaskState`.

        Args:
          graph: the model's `jaxprune.graph.PruningGraph`.
          total_epochs: the retraining length (checked only).
          steps_per_epoch: unused (the methods share one signature).

        Returns:
          ``Pruner(init, update, finalize, penalty)``; the penalty is zero.
        """
        del steps_per_epoch
        check_total_epochs(total_epochs)

        def init(variables):
            check_variables(variables)
            model_vars = {k: v for k, v in variables.items() if k == "params" or v}
            masks = pfec_masks(model_vars, graph, self.config, self.criterion, self.selection,
                               self.width)
            return harden(variables, masks, graph), MaskState(masks, dict(masks), zero_count())

        def update(variables, state):
            return variables, state._replace(count=next_count(state.count))

        def finalize(variables, state):
            return variables, state

        return Pruner(init, update, finalize, zero_penalty, total_epochs)


# ----------------------------------------------------------------------------- sensitivity


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """Accuracy after pruning one layer alone (PFEC Figure 2).

    Attributes:
      layers: a label per row (``'layer 2 (layer1_0/conv1)'`` or the group name).
      groups: the group pruned in each row.
      rates: the pruning rates (columns).
      accuracy: float ``[len(layers), len(rates)]``.
      baseline: accuracy of the unpruned variables.
    """

    layers: tuple[str, ...]
    groups: tuple[str, ...]
    rates: tuple[float, ...]
    accuracy: np.ndarray
    baseline: float


def _resolve_layer(layer: int | str, graph: PruningGraph, numbering: Mapping[int, str]
                   ) -> tuple[str, str]:
    p2g = graph.producer_to_group()
    if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        if layer not in numbering:
            raise ValueError(f"layer {layer} does not exist; the model's convs are layers "
                             f"1..{len(numbering)}")
        module = numbering[int(layer)]
        if module not in p2g:
            raise ValueError(f"layer {layer} ({module}) cannot be pruned: "
                             f"{graph.unprunable.get(module, 'not a prunable producer')}")
        return f"layer {layer} ({module})", p2g[module]
    if isinstance(layer, str):
        if layer in graph.groups:
            return layer, layer
        if layer in p2g:
            return layer, p2g[layer]
    raise ValueError(f"unknown layer {layer!r}: give a PFEC layer number, a group name or a "
                     f"producer module path; groups: {list(graph.groups)}")


def sensitivity(evaluate_fn: Callable[[Any], float], variables: Any, graph: PruningGraph,
                layers: Iterable[int | str], rates: Sequence[float] = DEFAULT_RATES,
                criterion: str = "l1", *, prepare: Callable[[str], None] | None = None,
                done: Mapping[str, Sequence[float]] | None = None,
                on_row: Callable[[str, str, list[float]], None] | None = None,
                progress: bool = False) -> SensitivityTable:
    """Prunes each layer alone at each rate and evaluates (PFEC's sensitivity analysis).

    Args:
      evaluate_fn: ``variables -> accuracy`` (any float metric), called on the masked
        variables (every member slice of the pruned channels zeroed).
      variables: the trained variables.
      graph: their `PruningGraph`.
      layers: PFEC layer numbers, group names or producer module paths.
      rates: pruning rates in [0, 1); the kept count is ``int(N * (1 - rate))``.
      criterion: the score, 'l1' as PFEC.
      prepare: called with a group's name before its rates are evaluated (e.g.
        `jaxprune.cut_eval.CutEvaluator.set_cut` for the group's first module).
      done: group -> accuracies already measured at ``rates`` (a resumed analysis); not redone.
      on_row: called with ``(label, group, accuracies)`` after each layer (to save progress).
      progress: a tqdm bar over the evaluations.
    """
    from tqdm import tqdm

    rates = tuple(validate.rate(r, "sensitivity rate") for r in rates)
    numbering = layer_numbers(graph)
    rows = [_resolve_layer(layer, graph, numbering) for layer in layers]
    done = dict(done or {})
    fn = criteria.get_criterion(criterion)
    if prepare is not None:
        prepare(None)
    baseline = float(evaluate_fn(variables))
    acc = np.zeros((len(rows), len(rates)), np.float64)
    bar = tqdm(total=len(rows) * len(rates), disable=not progress, desc="sensitivity",
               dynamic_ncols=True)
    for i, (label, group) in enumerate(rows):
        if group in done:
            if len(done[group]) != len(rates):
                raise ValueError(f"resumed sensitivity row {group!r} has {len(done[group])} "
                                 f"values for {len(rates)} rates")
            acc[i] = np.asarray(done[group], np.float64)
            bar.update(len(rates))
            continue
        if prepare is not None:
            prepare(group)
        score = fn(variables, subgraph(graph, [group]))
        for j, rate in enumerate(rates):
            masks = init_masks(graph)
            masks.update(sel.prune_by_rates(score, {group: rate}, rounding="pfec"))
            acc[i, j] = float(evaluate_fn(apply_masks(variables, masks, graph)))
            bar.update(1)
        if on_row is not None:
            on_row(label, group, [float(a) for a in acc[i]])
    bar.close()
    return SensitivityTable(tuple(r[0] for r in rows), tuple(r[1] for r in rows), rates, acc,
                            baseline)


def write_sensitivity_csv(table: SensitivityTable, path: str) -> None:
    """Long-format CSV: ``layer,group,rate,accuracy``; rate 0 rows hold the baseline."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "group", "rate", "accuracy"])
        for i, (label, group) in enumerate(zip(table.layers, table.groups)):
            w.writerow([label, group, 0.0, table.baseline])
            for j, rate in enumerate(table.rates):
                w.writerow([label, group, rate, float(table.accuracy[i, j])])


def stage_ends_of(model_name: str) -> tuple[int, ...]:
    """Last layer number of every stage but the last of a bundled CIFAR ResNet (depth 6n+2:
    ``(2n+1, 4n+1)``, e.g. ``(19, 37)`` for ResNet-56); ``()`` for other models."""
    name = str(model_name).lower()
    if name.startswith("resnet") and name[6:].isdigit():
        depth = int(name[6:])
        if (depth - 2) % 6 == 0 and depth in (20, 32, 44, 56, 110):
            n = (depth - 2) // 6
            return (2 * n + 1, 4 * n + 1)
    return ()


def _layer_number(label: str) -> int | None:
    parts = label.split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layer" and parts[1].isdigit() else None


def plot_sensitivity(table: SensitivityTable, path: str, title: str = "",
                     stage_ends: Sequence[int] = ()) -> None:
    """Accuracy vs filters pruned away (%), one line per layer (PFEC Figure 2 style); with
    ``stage_ends`` (see `stage_ends_of`) one panel per stage, as PFEC draws its ResNets."""
    from jaxprune._optional import require

    require("matplotlib", "plots", "the sensitivity plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    numbers_ = [_layer_number(label) for label in table.layers]
    if stage_ends and all(n is not None for n in numbers_):
        stage = [sum(n > e for e in stage_ends) for n in numbers_]
        panels = len(stage_ends) + 1
    else:
        stage, panels = [0] * len(table.layers), 1
    fig = Figure(figsize=(4.2 * panels, 4.2))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
    x = [0.0] + [100 * r for r in table.rates]
    lo = min(float(np.min(table.accuracy)), table.baseline) if table.accuracy.size else 0.0
    for i, label in enumerate(table.layers):
        short = f"layer {numbers_[i]}" if numbers_[i] is not None else label
        axes[stage[i]].plot(x, [100 * table.baseline] + list(100 * table.accuracy[i]),
                            marker="o", ms=3, lw=1, label=short)
    for k, ax in enumerate(axes):
        ax.set_xlabel("filters pruned away (%)")
        ax.set_ylim(100 * lo - 1, 100 * table.baseline + 1)
        ax.set_xlim(0, 100 * max(table.rates) + 2)
        if k == 0:
            ax.set_ylabel("test accuracy (%)")
        if panels > 1:
            ax.set_title(f"stage {k + 1}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
