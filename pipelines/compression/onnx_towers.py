"""The encoder towers as ONNX graphs run by onnxruntime, wrapped as modules that drop into
`CrossModalModel.encoders` (the route `onnx_int8` of `pipelines.compression.quantize`).

One graph per modality, exported with torch.onnx's dynamo exporter, holds the tower and its
alignment projection; batch, text length and audio patch count are dynamic axes:

    text   ids int64 (B, L), mask bool (B, L)                   -> tokens, token_mask, pooled, aligned
    image  image float32 (B, 3, H, W)                           -> tokens, token_mask, pooled, aligned
    audio  patches float32 (B, N, n_mels * P), valid bool (B, N) -> tokens, token_mask, pooled, aligned

The audio graph starts from the log-mel patches, which `OnnxTower` computes in PyTorch (the
model's own LogMel and AudioEncoder.patchify). The whole tower, STFT included, does export
(the dynamo exporter handles torch.stft's complex output; the TorchScript exporter does not),
but onnxruntime's DFT kernel made that graph 7x slower than the whole PyTorch tower (176 ms
against 26 ms at batch 32, one thread, the demo's teacher shape); torch.stft takes 7 ms.

`aligned` is `align[m](pooled)` before L2 normalisation; `OnnxAlign` (put in `model.align[m]`)
hands it to `CrossModalModel.embed` when embed is called on the pooled vector the tower just
returned (an identity check on the tensor), and otherwise falls back to its own INT8 Linear.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.encoders import AudioEncoder, Encoded, LogMel

INPUTS = {"text": ("ids", "mask"), "image": ("image",), "audio": ("patches", "valid")}
OUTPUTS = ("tokens", "token_mask", "pooled", "aligned")
KINDS = {"ids": np.int64, "mask": np.bool_, "image": np.float32, "patches": np.float32, "valid": np.bool_}


class AudioPatches(nn.Module):
    """The audio tower's first step, in PyTorch: log-mel spectrogram and its patches, by the
    model's own code (AudioEncoder.patchify, which reads mel, patch_frames and max_patches)."""

    def __init__(self, cfg):
        super().__init__()
        self.mel = LogMel(cfg)
        self.patch_frames, self.max_patches = cfg.audio_patch_frames, cfg.audio_patches

    def forward(self, wave: torch.Tensor, sample_mask: torch.Tensor | None = None):
        return AudioEncoder.patchify(self, wave, sample_mask)


class _TextGraph(nn.Module):
    def __init__(self, encoder: nn.Module, align: nn.Module):
        super().__init__()
        self.encoder, self.align = encoder, align

    def forward(self, ids, mask):
        e = self.encoder(ids, mask)
        return e.tokens, e.mask, e.pooled, self.align(e.pooled)


class _ImageGraph(_TextGraph):
    def forward(self, image):
        e = self.encoder(image)
        return e.tokens, e.mask, e.pooled, self.align(e.pooled)


class _AudioGraph(_TextGraph):
    """The audio encoder's forward from its patches on (export_tower makes its patchify a
    pass-through while exporting)."""

    def forward(self, patches, valid):
        e = self.encoder(patches, valid)
        return e.tokens, e.mask, e.pooled, self.align(e.pooled)


GRAPHS = {"text": _TextGraph, "image": _ImageGraph, "audio": _AudioGraph}


def tower_inputs(modality: str, batch: dict, audio: AudioPatches | None = None) -> tuple[torch.Tensor, ...]:
    """The graph's inputs from a model batch (audio: its patches by `audio`)."""
    if modality == "text":
        return batch["text_ids"].long(), batch["text_mask"].bool()
    if modality == "image":
        return (batch["image"].float(),)
    with torch.inference_mode():
        patches, valid = audio(batch["audio"].float(), batch.get("audio_mask"))
    return patches.float(), valid.bool()


def feeds(modality: str, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {
        name: np.ascontiguousarray(tensor.detach().cpu().numpy().astype(KINDS[name], copy=False))
        for name, tensor in zip(INPUTS[modality], inputs)
    }


def _dynamic_shapes(modality: str, cfg) -> dict:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=65536)
    if modality == "text":
        length = Dim("length", min=1, max=cfg.max_text_len)
        return {"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}
    if modality == "image":
        return {"image": {0: batch}}
    patches = Dim("patches", min=1, max=cfg.audio_patches)
    return {"patches": {0: batch, 1: patches}, "valid": {0: batch, 1: patches}}


def _passthrough(patches, valid):
    return patches, valid


def export_tower(model, modality: str, example: tuple[torch.Tensor, ...]) -> bytes:
    """The FP32 ONNX graph of one tower + its alignment projection, as bytes. `example` must have
    a batch of at least 2 (a batch of 1 would be specialised into the graph)."""
    encoder = model.encoders[modality]
    graph = GRAPHS[modality](encoder, model.align[modality]).eval()
    if modality == "audio":
        encoder.patchify = _passthrough  # an instance attribute over the method, removed below
    try:
        return _export(graph, modality, model.cfg, example)
    finally:
        if modality == "audio":
            del encoder.patchify


def _export(graph: nn.Module, modality: str, cfg, example: tuple[torch.Tensor, ...]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"{modality}.onnx"
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(modality, cfg),
            input_names=list(INPUTS[modality]),
            output_names=list(OUTPUTS),
            verbose=False,
        )
        program.save(str(path))
        if len(list(Path(tmp).iterdir())) != 1:
            raise RuntimeError(f"the {modality} graph was saved with external data (over 2 GB?)")
        return path.read_bytes()


def session(model_bytes: bytes, threads: int):
    """An onnxruntime CPU session: `threads` intra-op threads, no spin-waiting, no memory arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spin-waiting between runs: the fusion and decoder run in PyTorch on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No arena: it kept the batch-32 activations (20 MB more peak memory, same speed, measured).
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class OnnxTower(nn.Module):
    """An encoder tower run by onnxruntime; returns `Encoded` like the tower it replaces.

    `parameters_fp32`: the parameter count of the tower and projection it was exported from.
    `cfg`: the model config (the audio tower computes its log-mel patches in PyTorch).
    `threads`: onnxruntime's intra-op threads (default: torch's thread count when built).
    """

    def __init__(
        self, modality: str, model_bytes: bytes, width: int, parameters_fp32: int, cfg, threads: int | None = None
    ):
        super().__init__()
        if modality not in INPUTS:
            raise ValueError(f"unknown modality {modality!r}")
        self.modality, self.model_bytes, self.width = modality, model_bytes, width
        self.parameters_fp32 = parameters_fp32
        self.audio = AudioPatches(cfg) if modality == "audio" else None
        self.threads = threads or torch.get_num_threads()
        self.cache: dict = {}  # shared with the OnnxAlign of this modality: the last (pooled, aligned)
        self.session = session(model_bytes, self.threads)

    def forward(self, *inputs, keep=None) -> Encoded:
        if keep is not None:
            raise ValueError("an ONNX tower does not support patch masking (keep)")
        if self.audio is not None:
            inputs = self.audio(inputs[0], inputs[1] if len(inputs) > 1 else None)
        outputs = self.session.run(list(OUTPUTS), feeds(self.modality, inputs))
        tokens, mask, pooled, aligned = (torch.from_numpy(o) for o in outputs)
        self.cache["last"] = (pooled, aligned)
        return Encoded(tokens, mask, pooled)

    def set_threads(self, threads: int) -> None:
        """A new session with this many intra-op threads."""
        self.threads = threads
        self.session = session(self.model_bytes, threads)

    def __getstate__(self):  # deepcopy: the session is rebuilt from the bytes
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = session(self.model_bytes, self.threads)

    def extra_repr(self) -> str:
        return f"{self.modality}, {len(self.model_bytes) / 1e6:.2f} MB, threads={self.threads}"


class OnnxAlign(nn.Module):
    """`model.align[m]` beside an OnnxTower: the graph's own projection of the pooled vector the
    tower returned last, else (another tensor) its fallback Linear."""

    def __init__(self, tower: OnnxTower, fallback: nn.Module):
        super().__init__()
        self.fallback = fallback
        self.cache = tower.cache  # a plain dict shared with the tower, not a submodule

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        last = self.cache.get("last")
        if last is not None and last[0] is pooled:
            return last[1]
        return self.fallback(pooled)


# Ops whose FP32 weight initializer (input index) the dynamic quantizer leaves FP32: Conv (its
# INT8 kernel, ConvInteger, is slower than FP32 Conv on CPU) and Gather (the token embedding).
WEIGHT_ONLY = {"Conv": 1, "Gather": 0}


def int8_initializers(model_bytes: bytes, ops: dict[str, int] = WEIGHT_ONLY, min_size: int = 256) -> bytes:
    """Weight-only INT8 of those ops' FP32 weight initializers (symmetric, per slice of dim 0:
    an output channel, a table row): each becomes int8 values + scales + a DequantizeLinear, so
    the file holds INT8 and the op computes in FP32 on the dequantized weight. Also drops the
    exporter's per-node metadata (source stack traces)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load_from_string(model_bytes)
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    done: dict[str, str] = {}
    added = []
    for node in graph.node:
        index = ops.get(node.op_type)
        if index is None or index >= len(node.input) or node.input[index] not in initializers:
            continue
        name = node.input[index]
        if name not in done:
            weight = numpy_helper.to_array(initializers[name])
            if weight.dtype != np.float32 or weight.ndim < 2 or weight.size < min_size:
                continue
            flat = weight.reshape(weight.shape[0], -1)
            scale = np.maximum(np.abs(flat).max(axis=1), 1e-12).astype(np.float32) / 127.0
            values = np.clip(np.round(flat / scale[:, None]), -127, 127).astype(np.int8).reshape(weight.shape)
            zero = np.zeros(weight.shape[0], dtype=np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(values, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_int8_scale"),
                    numpy_helper.from_array(zero, f"{name}_int8_zero"),
                ]
            )
            done[name] = f"{name}_dequantized"
            added.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zero"],
                    [done[name]],
                    name=f"{name}_dequantize",
                    axis=0,
                )
            )
        node.input[index] = done[name]
    for node in graph.node:  # the exporter's per-node stack traces: a fifth of a small graph's bytes
        del node.metadata_props[:]
    still_used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name not in done or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = added + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto.SerializeToString()
