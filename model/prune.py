"""Structured pruning: whole attention heads, MLP channels and conv channels go, so the pruned
model has smaller matrices (not zeroed ones), a ModelConfig that describes it, and `model.io`
saves and reloads it like any other model.

The recipe (the pipeline's `prune` stage):

    scores = importance(model, "taylor", calibration_batches)  # or "l1" / "l2": no data needed
    pruned = prune(model, heads=0.5, mlp=0.5, conv=0.5, scores=scores)
    report(model, pruned)  # parameters, heads, MLP and conv channels, before and after
    # then save it, and fine-tune it to recover

Fractions are the share removed, and at least one head or channel always stays. Every block of
a tower keeps the same NUMBER of heads and MLP channels, so one TowerConfig (heads, head_dim,
mlp_hidden) describes the tower, but each block keeps its OWN best-scoring ones.

torch-pruning does the conv tower: its DependencyGraph finds the layers that share a channel (a
conv's output, its GroupNorm, the next depthwise conv and its norm, the next conv's input), its
group importance scores those channels, and it cuts them. The Transformer towers are cut here by
hand: torch-pruning prunes modules in place from a traced graph, and tracing the whole model
(dict batches, residual streams that tie every block's output together, fused qkv next to
separate q/kv cross-attention) takes more configuration than the few lines of index arithmetic
below, while the result must be rebuilt from a per-tower config anyway.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from torch import nn

from model.config import LossWeights, ModelConfig
from model.encoders import ConvEncoder, conv_widths
from model.layers import MLP, Attention
from model.multimodal import CrossModalModel, parameter_counts
from model.objectives import MultiTaskObjective

CRITERIA = ("taylor", "l1", "l2")
TOWERS = ("text", "image", "audio", "fusion_tower", "decoder")  # the ModelConfig fields pruning can change
# Which tower's config describes the layers under each module-name prefix.
TOWER_OF = {
    "encoders.text.": "text",
    "encoders.image.": "image",
    "image_reconstruction.": "image",
    "encoders.audio.": "audio",
    "audio_reconstruction.": "audio",
    "fusion.": "fusion_tower",
    "decoder.": "decoder",
}
CONV = "encoders.image.conv."  # score keys of the conv tower: CONV + layer (0 = the stem, then each block)

Scores = dict[str, torch.Tensor]  # per prunable unit: one score per head / channel, higher = keep


# -- what can be pruned ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """A parameter's share of a prunable unit: along `dim` it holds `chunks` blocks (q, k and v
    of a fused qkv) of `count` items (heads or channels) of `size` rows each."""

    param: str
    dim: int
    chunks: int = 1
    size: int = 1


@dataclass(frozen=True)
class Unit:
    """The heads of one attention layer, or the hidden channels of one MLP."""

    tower: str  # the ModelConfig field that describes it
    kind: str  # "heads" or "mlp"
    count: int
    cuts: tuple[Cut, ...]


def units(model: CrossModalModel) -> dict[str, Unit]:
    """Every attention layer and MLP of the model, by module name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            found[name] = attention_unit(name, module)
        elif isinstance(module, MLP):
            cuts = (Cut(f"{name}.fc1.weight", 0), Cut(f"{name}.fc1.bias", 0), Cut(f"{name}.fc2.weight", 1))
            found[name] = Unit(tower_of(name), "mlp", module.fc1.out_features, cuts)
    return found


def attention_unit(name: str, attention: Attention) -> Unit:
    """A head owns its rows of q, k and v (weights and biases) and its columns of `proj`."""
    d = attention.head_dim
    inputs = (("q", 1), ("kv", 2)) if attention.cross else (("qkv", 3),)
    cuts = [Cut(f"{name}.{layer}.{p}", 0, chunks, d) for layer, chunks in inputs for p in ("weight", "bias")]
    return Unit(tower_of(name), "heads", attention.heads, (*cuts, Cut(f"{name}.proj.weight", 1, 1, d)))


def tower_of(name: str) -> str:
    for prefix, tower in TOWER_OF.items():
        if name.startswith(prefix):
            return tower
    raise ValueError(f"{name}: no tower config describes this layer, so it cannot be pruned")


class ConvChannels:
    """The conv tower's prunable channels, through torch-pruning's DependencyGraph: the outputs of
    the stem and of every block but the last (whose output is the tower's width)."""

    def __init__(self, encoder: ConvEncoder, image_size: int):
        weight = encoder.stem[0].weight
        example = torch.zeros(1, 3, image_size, image_size, dtype=weight.dtype, device=weight.device)
        # A container over the encoder's own modules: the graph's groups point at them.
        features = nn.Sequential(encoder.stem, encoder.blocks)
        # The graph is traced through autograd: on even when the caller pruned under no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            self.graph = tp.DependencyGraph().build_dependency(features, example_inputs=example)
        layers = [encoder.stem, *encoder.blocks][:-1]
        self.producers = [[m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1] for layer in layers]

    def group(self, layer: int, channels: list[int]) -> tp.Group:
        """Layer `layer`'s output channels `channels`, with every parameter that shares them."""
        return self.graph.get_pruning_group(self.producers[layer], tp.prune_conv_out_channels, idxs=channels)

    def scores(self, criterion: str) -> Scores:
        if criterion == "taylor" and self.producers[0].weight.grad is None:
            return {}  # no image in this batch: nothing to learn about these channels
        scorer = (
            tp.importance.GroupTaylorImportance(normalizer=None)
            if criterion == "taylor"
            else tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2, normalizer=None)
        )
        return {
            f"{CONV}{i}": scorer(self.group(i, list(range(conv.out_channels)))).float()
            for i, conv in enumerate(self.producers)
        }


def conv_channels(model: CrossModalModel) -> ConvChannels | None:
    if model.cfg.image_encoder != "conv":
        return None
    return ConvChannels(model.encoders["image"], model.cfg.image_size)


# -- importance ------------------------------------------------------------------------------------
def importance(
    model: CrossModalModel,
    criterion: str = "l2",
    batches: Iterable[dict] = (),
    objective: MultiTaskObjective | None = None,
    seed: int = 0,
) -> Scores:
    """One score per head, MLP channel and conv channel, higher = keep.

    "l1" / "l2": the magnitude (sum of |w|, of w^2) of the weights each one owns; no data.
    "taylor": |weight * gradient| of the multi-task loss (Molchanov et al. 2019: the first-order
    change of the loss were the weight zeroed), summed over the weights each one owns and over
    `batches` (a few training batches), computed in eval mode so dropout adds no noise."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    found, conv = units(model), conv_channels(model)
    if criterion != "taylor":
        return unit_scores(model, found, criterion) | (conv.scores(criterion) if conv else {})
    return taylor(model, found, conv, batches, objective or MultiTaskObjective(LossWeights()), seed)


def taylor(model, found, conv, batches, objective, seed) -> Scores:
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    totals: Scores = {}
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss, _ = objective(model, batch, generator)
            loss.backward()
            scores = unit_scores(model, found, "taylor") | (conv.scores("taylor") if conv else {})
            totals = {key: totals.get(key, 0) + value for key, value in scores.items()}
    finally:
        model.zero_grad(set_to_none=True)  # leave no calibration gradients for an optimizer to apply
        model.train(was_training)
    if not totals:
        raise ValueError("Taylor importance needs at least one calibration batch")
    return totals


@torch.no_grad()
def unit_scores(model: CrossModalModel, found: dict[str, Unit], criterion: str) -> Scores:
    params = dict(model.named_parameters())
    return {name: unit_score(unit, params, criterion) for name, unit in found.items()}


def unit_score(unit: Unit, params: dict[str, nn.Parameter], criterion: str) -> torch.Tensor:
    total = torch.zeros(unit.count, device=params[unit.cuts[0].param].device)
    for cut in unit.cuts:
        value = statistic(params[cut.param], criterion).float()
        total += value.movedim(cut.dim, 0).reshape(cut.chunks, unit.count, cut.size, -1).sum(dim=(0, 2, 3))
    return total


def statistic(p: nn.Parameter, criterion: str) -> torch.Tensor:
    if criterion == "l1":
        return p.abs()
    if criterion == "l2":
        return p.square()
    # A layer the loss never reached (e.g. no audio in any batch) has no gradient: it scores 0.
    return (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)


# -- pruning ---------------------------------------------------------------------------------------
def prune(
    model: CrossModalModel,
    heads: float = 0.5,
    mlp: float = 0.5,
    conv: float = 0.5,
    scores: Scores | None = None,
    towers: Iterable[str] = TOWERS,
) -> CrossModalModel:
    """A new, smaller model: `heads` of every attention layer's heads, `mlp` of every MLP's hidden
    channels and `conv` of the conv tower's channels removed (shares, in [0, 1)), the
    lowest-scoring ones by `scores` (default: importance(model, "l2")). Only `towers` (ModelConfig
    field names; the conv channels are "image"'s) change; every other weight is copied as it is.
    Same dtype, device and mode as `model`."""
    for name, share in (("heads", heads), ("mlp", mlp), ("conv", conv)):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{name}: the share to remove must be in [0, 1), got {share}")
    towers = tuple(towers)
    if unknown := set(towers) - set(TOWERS):
        raise ValueError(f"unknown towers {sorted(unknown)} (towers: {', '.join(TOWERS)})")
    found = {name: unit for name, unit in units(model).items() if unit.tower in towers}
    cfg = pruned_config(model.cfg, found, heads, mlp, conv if "image" in towers else 0.0)
    scores = importance(model, "l2") if scores is None else scores
    state = model.state_dict()
    for name, unit in found.items():
        keep = kept(cfg, name, unit)
        if keep < unit.count:
            cut(state, unit, best(scores, name, keep))
    if cfg.conv_channels != model.cfg.conv_channels:
        state |= pruned_conv_state(model, cfg, scores)
    pruned = CrossModalModel(cfg).to(next(model.parameters()))  # its dtype and device
    pruned.load_state_dict(state)  # strict: every pruned shape must be what the config builds
    return pruned.train(model.training)


def keep_count(count: int, share: float) -> int:
    """What remains when `share` of `count` goes: the nearest count (halves up), at least one."""
    return max(1, min(count, int(count * (1 - share) + 0.5)))


def keep_channels(count: int, share: float) -> int:
    """As keep_count, but the same number from each GroupNorm group (norm2d: gcd(8, channels)
    groups), and a count that gives the pruned norm as many groups: see best_channels."""
    groups = math.gcd(8, count)
    per_group = keep_count(count // groups, share)
    if groups < 8 and per_group % 2 == 0:  # gcd(8, groups * even) would be more groups
        per_group -= 1
    return groups * per_group


def pruned_config(cfg: ModelConfig, found: dict[str, Unit], heads: float, mlp: float, conv: float) -> ModelConfig:
    """The config that describes the pruned model: fewer heads of the same head_dim, an exact
    MLP hidden count, the conv tower's channels. Towers with nothing to prune stay as they are."""
    kinds = {(unit.tower, unit.kind) for unit in found.values()}
    changes = {}
    for name in {unit.tower for unit in found.values()}:
        t = getattr(cfg, name)
        if heads and (name, "heads") in kinds:
            t = replace(t, heads=keep_count(t.heads, heads), head_dim=t.head_width)
        if mlp and (name, "mlp") in kinds:
            t = replace(t, mlp_hidden=keep_count(t.hidden, mlp))
        changes[name] = t
    if conv and cfg.image_encoder == "conv":
        changes["conv_channels"] = tuple(keep_channels(c, conv) for c in conv_widths(cfg)[:-1])
    return replace(cfg, **changes)


def kept(cfg: ModelConfig, name: str, unit: Unit) -> int:
    """How many of the unit's heads / channels the pruned config has."""
    tower = getattr(cfg, unit.tower)
    # An MLP keeps its count while its tower has no mlp_hidden: the MAE head's block has 4x the
    # width whatever the tower's mlp_ratio (see PatchReconstructionHead).
    keep = tower.heads if unit.kind == "heads" else unit.count if tower.mlp_hidden is None else tower.mlp_hidden
    if keep > unit.count:
        raise ValueError(f"{name}: the pruned {unit.tower} keeps {keep} of its {unit.count} {unit.kind} channels")
    return keep


def best(scores: Scores, name: str, keep: int) -> torch.Tensor:
    """Indices of the `keep` best-scoring items of a unit, in their original order."""
    if name not in scores:
        raise KeyError(f"no importance scores for {name}")
    return scores[name].topk(keep).indices.sort().values


def cut(state: dict[str, torch.Tensor], unit: Unit, keep: torch.Tensor) -> None:
    """Replace the unit's parameters in `state` by their rows / columns of the kept items."""
    for c in unit.cuts:
        tensor = state[c.param]
        chunk = torch.arange(c.chunks)[:, None, None] * unit.count * c.size
        rows = chunk + keep.cpu()[None, :, None] * c.size + torch.arange(c.size)[None, None, :]
        state[c.param] = tensor.index_select(c.dim, rows.flatten().to(tensor.device))


def pruned_conv_state(model: CrossModalModel, cfg: ModelConfig, scores: Scores) -> dict[str, torch.Tensor]:
    """The conv layers' weights with only the kept channels: torch-pruning cuts a copy of the
    tower, every layer that shares a channel at once."""
    encoder = copy.deepcopy(model.encoders["image"])
    channels = ConvChannels(encoder, cfg.image_size)
    for i, (producer, keep) in enumerate(zip(channels.producers, cfg.conv_channels)):
        if keep < producer.out_channels:
            kept_channels = set(best_channels(scores, f"{CONV}{i}", keep).tolist())
            channels.group(i, [c for c in range(producer.out_channels) if c not in kept_channels]).prune()
    return {f"encoders.image.{k}": v for k, v in encoder.state_dict().items() if k.startswith(("stem.", "blocks."))}


def best_channels(scores: Scores, name: str, keep: int) -> torch.Tensor:
    """The best channels of each GroupNorm group, as many from each: the survivors of a group
    form one group of the pruned norm, normalised together as before. Chosen regardless of
    groups, the pruned norm would mix channels of different groups and change every channel's
    statistics (probe, Taylor scores, a 128-wide tiny conv tower after 40 steps: the image
    embeddings kept a cosine of 0.41 to the unpruned ones with a quarter of the channels gone,
    0.75 with groups kept; 0.16 against 0.44 with half gone)."""
    if name not in scores:
        raise KeyError(f"no importance scores for {name}")
    count = scores[name].numel()
    groups = math.gcd(8, count)
    per_group = scores[name].view(groups, count // groups)
    offsets = torch.arange(groups, device=per_group.device)[:, None] * (count // groups)
    return (per_group.topk(keep // groups, dim=1).indices + offsets).flatten().sort().values


# -- report ----------------------------------------------------------------------------------------
def report(before: CrossModalModel, after: CrossModalModel) -> dict:
    """Parameters, each tower's heads and MLP hidden channels, and the conv tower's channels,
    as [before, after] pairs (JSON-ready, for the run's log)."""
    b, a = before.cfg, after.cfg
    out = {
        "parameters": [parameter_counts(before)["total"], parameter_counts(after)["total"]],
        "towers": {
            name: {
                "heads": [getattr(b, name).heads, getattr(a, name).heads],
                "mlp_hidden": [getattr(b, name).hidden, getattr(a, name).hidden],
            }
            for name in TOWERS
        },
    }
    if b.image_encoder == "conv":
        out["conv_channels"] = [conv_widths(b), conv_widths(a)]
    return out
