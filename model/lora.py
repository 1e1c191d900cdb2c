"""LoRA adapters (F7) through `peft` on the Linear layers of the fusion encoder and the decoder.

`add_lora` freezes everything else; `merge_lora` folds the adapters into the weights and
returns a plain CrossModalModel again, for export.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import LORA_TARGETS

# Attention (qkv / q / kv / proj) and MLP (fc1 / fc2) layers of the fusion encoder and decoder.
DEFAULT_TARGETS = LORA_TARGETS


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    targets: str = DEFAULT_TARGETS,
    train_heads: bool = False,
) -> nn.Module:
    """Wrap the model with LoRA adapters; only the adapters (and the heads, if asked) train."""
    from peft import LoraConfig, get_peft_model  # 3 s import: only when LoRA is used

    heads = ["matching_head", "answer_head"] if train_heads else None
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=heads, bias="none"
    )
    return get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the unwrapped model."""
    return peft_model.merge_and_unload()


def trainable_parameters(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapted(peft_model: nn.Module) -> nn.Module:
    """The model itself with its adapters in place: what trains. Its methods and parameter
    names are the model's own (adapted layers gain `base_layer` and `lora_*` parts), so the
    objective and the checkpoints see the same module with or without the peft wrapper."""
    return peft_model.base_model.model


def load_adapters(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The trainable tensors (adapters, trained heads) of `state`, keyed as `adapted`'s
    parameters, into the wrapped model; every other weight stays as it is (frozen: the
    starting model's). KeyError naming the first adapter `state` lacks."""
    model = adapted(peft_model)
    names = trainable_parameters(model)
    missing = [name for name in names if name not in state]
    if missing:
        raise KeyError(f"{missing[0]}: an adapter tensor the state does not hold ({len(missing)} missing)")
    model.load_state_dict({name: state[name] for name in names}, strict=False)


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (tied weights counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}
