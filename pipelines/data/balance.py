"""Modality balancing (F11): resample the stream to a target mixture of modality combinations,
and attach per-sample loss weights.

Each combination (image+text+audio, image+text, text+audio, ...) gets a multiplicity
m = target share * total / count: a sample is emitted floor(m) times plus once more with
probability frac(m), drawn from (seed, epoch, key). Combinations the target does not name keep
m = 1 and the named ones share what is left. Over an epoch the mixture matches the target.
"""

from __future__ import annotations

import numpy as np

from pipelines.data.augment import sample_seed


def multiplicities(counts: dict[str, int], target: dict[str, float] | None) -> dict[str, float]:
    """Expected copies per sample of each combination so the stream matches the target."""
    if not target:
        return {combo: 1.0 for combo in counts}
    total = sum(counts.values())
    untouched = {c: n for c, n in counts.items() if c not in target}
    named_share = sum(share for combo, share in target.items() if counts.get(combo))
    # Named combinations fill what the untouched ones leave, in the proportions the target gives.
    room = 1.0 - sum(untouched.values()) / total
    out = {combo: 1.0 for combo in untouched}
    for combo, share in target.items():
        if counts.get(combo):
            out[combo] = (share / named_share) * room * total / counts[combo] if named_share else 0.0
    return out


def loss_weights(after: dict[str, float], mode) -> dict[str, float]:
    """Per-combination loss weight, mean 1 over the (resampled) stream."""
    if mode == "none":
        return {combo: 1.0 for combo in after}
    if isinstance(mode, dict):
        raw = {combo: float(mode.get(combo, 1.0)) for combo in after}
    else:  # inverse frequency: every combination contributes the same total weight
        raw = {combo: 1.0 / n for combo, n in after.items() if n > 0}
    total, mass = sum(after.values()), sum(raw.get(c, 0.0) * n for c, n in after.items())
    return {combo: raw.get(combo, 0.0) * total / mass for combo in after} if mass else raw


def copies(key: str, multiplicity: float, seed: int, epoch: int) -> int:
    whole = int(np.floor(multiplicity))
    extra = multiplicity - whole
    if extra <= 0:
        return whole
    draw = sample_seed(seed, epoch, key, "balance") / 0x7FFFFFFF
    return whole + int(draw < extra)


def expected_counts(
    keys_by_combo: dict[str, list[str]], mult: dict[str, float], seed: int, epoch: int
) -> dict[str, int]:
    """The exact counts one epoch of the resampled stream will have."""
    return {
        combo: sum(copies(k, mult.get(combo, 1.0), seed, epoch) for k in keys) for combo, keys in keys_by_combo.items()
    }
