"""LoRA adapters (F7) through `peft` on the Linear layers of the fusion encoder and the decoder.

`add_lora` freezes everything else; `merge_lora` folds the adapters into the weights and
returns a plain CrossModalModel again, for export.
"""

from __future__ import annotations

from torch import nn

# Attention (qkv / q / kv / proj) and MLP (fc1 / fc2) layers of the fusion encoder and decoder.
DEFAULT_TARGETS = r"(fusion|decoder)\..*\.(qkv|q|kv|proj|fc1|fc2)"


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
