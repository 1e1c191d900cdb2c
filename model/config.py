"""Model configuration, the size registry (tiny / small / base) and the loss weights.

Plain dataclasses of the standard library, JSON round-trippable, so a saved model folder
rebuilds the exact model. The pipeline's config sections are built from them (no field is
written twice) and validated at load with pydantic; the model library trusts the values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

MODALITIES = ("text", "image", "audio")
FUSIONS = ("early", "late", "hierarchical")
IMAGE_ENCODERS = ("vit", "conv")
# The layers LoRA adapts by default (model.lora): attention (qkv / q / kv / proj) and MLP
# (fc1 / fc2) of the fusion encoder and the decoder. Here, not in model.lora, so the pipeline's
# config can name it without importing torch.
LORA_TARGETS = r"(fusion|decoder)\..*\.(qkv|q|kv|proj|fc1|fc2)"


@dataclass(frozen=True)
class TowerConfig:
    """A Transformer stack: width, depth, attention heads, MLP expansion.

    `head_dim` and `mlp_hidden` describe a pruned tower (model.prune): fewer heads of the
    original size, so heads * head_dim may be less than the width, and an exact MLP hidden
    count, which a float ratio could round a channel off. None: width // heads and
    int(width * mlp_ratio), as before they existed."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    head_dim: int | None = None
    mlp_hidden: int | None = None

    @property
    def head_width(self) -> int:
        return self.width // self.heads if self.head_dim is None else self.head_dim

    @property
    def hidden(self) -> int:
        """The MLP's hidden channels."""
        return int(self.width * self.mlp_ratio) if self.mlp_hidden is None else self.mlp_hidden


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"
    embed_dim: int = 64  # the shared embedding space every modality is aligned into
    # text
    vocab_size: int = 512
    max_text_len: int = 48
    text: TowerConfig = field(default_factory=lambda: TowerConfig(64, 2, 2))
    # image: "vit" (patch Transformer) or "conv" (a light CNN with attention over its map; see ConvEncoder)
    image_encoder: str = "vit"
    image_size: int = 64
    patch_size: int = 8  # ViT: the patch side; conv: the pixels each cell of its output map covers
    image: TowerConfig = field(default_factory=lambda: TowerConfig(64, 2, 2))
    # conv encoder: Transformer blocks over its feature map, so pooled features can say what is
    # where (see ConvEncoder). 0 in the registered sizes: in the 9-minute CPU demo two blocks
    # cost a fifth of the throughput and scored no better (test t2i 0.60 vs 0.64).
    conv_attention_layers: int = 0
    # conv encoder: how its feature map becomes the pooled (embedding) vector. "mean" averages the
    # cells, so it says what is there but not where (the position embedding adds a constant);
    # "flatten" is a linear map of the whole map (VGG's head), so each cell keeps its place.
    conv_pool: str = "mean"
    # conv encoder: channels of the stem and of every block but the last (whose output is
    # image.width: the position embedding and attention read it). None: derived from image.width
    # and depth (see ConvEncoder); set by pruning (model.prune).
    conv_channels: tuple[int, ...] | None = None
    # audio: log-mel spectrogram, then a Transformer over patches of `audio_patch_frames` frames
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    audio_patch_frames: int = 4
    audio: TowerConfig = field(default_factory=lambda: TowerConfig(64, 2, 2))
    # fusion: early (joint self-attention over all tokens), late (pooled per-modality outputs
    # merged at the head), hierarchical (co-attention in the middle layers, joint on top)
    fusion: str = "hierarchical"
    fusion_tower: TowerConfig = field(default_factory=lambda: TowerConfig(64, 2, 2))
    co_attention_layers: int = 1
    decoder: TowerConfig = field(default_factory=lambda: TowerConfig(64, 2, 2))
    num_answers: int = 32
    dropout: float = 0.0
    modality_dropout: float = 0.15  # chance a present modality is hidden from a fused task in training

    def __post_init__(self):
        if self.conv_channels is not None:  # JSON and YAML give lists; a tuple keeps the config hashable
            object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        if self.conv_pool not in ("mean", "flatten"):
            raise ValueError(f"conv_pool must be 'mean' or 'flatten', got {self.conv_pool!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        powers_of_two = {2**k for k in range(1, self.image.depth + 2)}  # the stem, then each block
        if self.image_encoder == "conv" and self.patch_size not in powers_of_two:
            raise ValueError(
                f"the conv image encoder halves the image {self.image.depth + 1} times at most: "
                f"patch_size must be a power of two from 2 to {2 ** (self.image.depth + 1)}, got {self.patch_size}"
            )
        if self.fusion == "hierarchical" and not 0 < self.co_attention_layers <= self.fusion_tower.depth:
            raise ValueError("co_attention_layers must be in [1, fusion_tower.depth] for hierarchical fusion")
        for tower in (self.text, self.image, self.audio, self.fusion_tower, self.decoder):
            check_tower(tower)
        if self.conv_channels is not None:
            if self.image_encoder != "conv":
                raise ValueError("conv_channels describes the conv image encoder; image_encoder is not 'conv'")
            if len(self.conv_channels) != self.image.depth or min(self.conv_channels) < 1:
                raise ValueError(
                    f"conv_channels needs {self.image.depth} positive counts (the stem and every block but "
                    f"the last), got {list(self.conv_channels)}"
                )

    @property
    def audio_samples(self) -> int:
        return int(round(self.sample_rate * self.audio_seconds))

    @property
    def audio_frames(self) -> int:
        return 1 + (self.audio_samples - self.n_fft) // self.hop_length

    @property
    def audio_patches(self) -> int:
        return self.audio_frames // self.audio_patch_frames

    @property
    def image_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        towers = {f.name for f in fields(cls) if f.type in ("TowerConfig", TowerConfig)}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: TowerConfig(**v) if k in towers else v for k, v in data.items()})


def check_tower(tower: TowerConfig) -> None:
    if tower.heads < 1:
        raise ValueError(f"a tower needs at least one attention head, got {tower.heads}")
    if tower.head_dim is None and tower.width % tower.heads:
        raise ValueError(f"tower width {tower.width} is not divisible by its {tower.heads} heads")
    if tower.head_dim is not None and tower.head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {tower.head_dim}")
    if tower.mlp_hidden is not None and tower.mlp_hidden < 1:
        raise ValueError(f"mlp_hidden must be positive, got {tower.mlp_hidden}")


def weight(default: float, doc: str, **bounds) -> float:
    """A loss weight's default, with its bounds and meaning for the pipeline's config (metadata)."""
    return field(default=default, metadata={"ge": 0.0, "doc": doc} | bounds)


@dataclass(frozen=True)
class LossWeights:
    """Task weights of the multi-task objective (model.objectives); the pipeline's
    `train.losses` section is built from these fields, bounds included."""

    contrastive: float = weight(1.0, "InfoNCE over every pair of present modalities")
    matching: float = weight(0.5, "text<->image/audio matching with in-batch hard negatives")
    masked_text: float = weight(0.5, "masked tokens predicted from fused text + image/audio")
    masked_image: float = weight(0.25, "MAE on image patches")
    masked_audio: float = weight(0.25, "MAE on log-mel patches")
    caption: float = weight(1.0, "caption from image and/or audio")
    answer: float = weight(0.5, "free-form answer from question + image/audio")
    vqa: float = weight(1.0, "answer class from question + image/audio")
    text_mask_ratio: float = weight(0.15, "share of text tokens masked", gt=0.0, lt=1.0)
    patch_mask_ratio: float = weight(0.6, "share of image/log-mel patches masked", gt=0.0, lt=1.0)
    # HN-NCE (Radenovic et al. 2023): once the easy in-batch negatives are solved, the hard ones
    # still carry weight.
    hard_negative_weight: float = weight(1.0, "each hard negative caption counts as this many negatives", ge=1.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DistillWeights:
    """Weights of the distillation losses (model.distill), added to the student's task losses;
    the pipeline's `distill.kd` section is built from these fields."""

    similarity: float = weight(1.0, "KL of the teacher's and student's cross-modal similarity distributions")
    embedding: float = weight(1.0, "cosine distance of projected student embeddings to the teacher's")
    tokens: float = weight(1.0, "KL of the caption-token distributions")
    answers: float = weight(1.0, "KL of the VQA answer distributions")
    temperature: float = weight(2.0, "softens both distributions of the token and answer KL", gt=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, ModelConfig] = {
    # Tests: under 2M parameters, 64x64 images, 1 s of audio.
    "tiny": ModelConfig(),
    # The CPU demo: trains on 2 cores in minutes.
    "small": ModelConfig(
        size="small",
        embed_dim=128,
        vocab_size=1024,
        text=TowerConfig(128, 3, 4),
        image=TowerConfig(128, 4, 4),
        audio=TowerConfig(128, 3, 4),
        fusion_tower=TowerConfig(128, 3, 4),
        co_attention_layers=1,
        decoder=TowerConfig(128, 2, 4),
    ),
    # GPU: a CLIP ViT-B/16 image tower and text tower plus an audio tower of the same size.
    "base": ModelConfig(
        size="base",
        embed_dim=512,
        vocab_size=32000,
        max_text_len=77,
        text=TowerConfig(512, 12, 8),
        image_size=224,
        patch_size=16,
        image=TowerConfig(768, 12, 12),
        sample_rate=16000,
        audio_seconds=10.0,
        n_mels=128,
        audio_patch_frames=8,
        audio=TowerConfig(768, 12, 12),
        fusion_tower=TowerConfig(768, 6, 12),
        co_attention_layers=2,
        decoder=TowerConfig(768, 6, 12),
        num_answers=3129,
    ),
}


def model_config(size: str = "tiny", **overrides) -> ModelConfig:
    """A registered size with some fields replaced (towers as dicts or TowerConfig)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r} (sizes: {', '.join(SIZES)})")
    base = SIZES[size]
    towers = {f.name for f in fields(ModelConfig) if f.type in ("TowerConfig", TowerConfig)}
    cleaned = {k: TowerConfig(**v) if k in towers and isinstance(v, dict) else v for k, v in overrides.items()}
    return replace(base, **cleaned)
