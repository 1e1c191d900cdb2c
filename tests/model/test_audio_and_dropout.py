"""The log-mel front end matches librosa; modality dropout hides modalities but never all."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from model.config import model_config
from model.encoders import LogMel, mel_filters
from model.objectives import drop_modalities


@pytest.mark.parametrize("rate, n_fft, n_mels", [(16000, 400, 40), (16000, 512, 128), (22050, 1024, 80)])
def test_mel_filters_equal_librosa_htk(rate, n_fft, n_mels):
    ours = mel_filters(rate, n_fft, n_mels).numpy().T
    np.testing.assert_allclose(
        ours, librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, htk=True, norm=None), atol=1e-6
    )


def test_log_mel_matches_librosa_power_spectrogram():
    cfg = model_config("tiny")
    wave = np.sin(2 * np.pi * 440 * np.arange(cfg.audio_samples) / cfg.sample_rate).astype(np.float32)
    ours = LogMel(cfg)(torch.from_numpy(wave)[None])[0].numpy()
    mel = librosa.feature.melspectrogram(
        y=wave,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        htk=True,
        norm=None,
        center=False,
        power=2.0,
    )
    np.testing.assert_allclose(ours, (np.log(mel + 1e-6) + 4) / 4, atol=1e-3)
    assert ours.shape == (cfg.n_mels, cfg.audio_frames)


def test_frame_mask_marks_frames_inside_the_valid_prefix():
    cfg = model_config("tiny")
    valid = torch.arange(cfg.audio_samples)[None] < 800  # 50 ms
    mask = LogMel(cfg).frame_mask(valid)[0]
    # frame i covers [160 i, 160 i + 400): frames 0..2 end by sample 720 <= 800; frame 3 ends at 880
    assert mask[:4].tolist() == [True, True, True, False] and not mask[4:].any()


def test_modality_dropout_rate_and_never_everything():
    g = torch.Generator().manual_seed(0)
    present = {
        "text": torch.ones(20000, dtype=torch.bool),
        "image": torch.ones(20000, dtype=torch.bool),
        "audio": torch.rand(20000, generator=g) < 0.5,
    }
    dropped = drop_modalities(present, 0.3, g)
    assert torch.equal(dropped["text"], present["text"])  # text is the target side, never dropped
    assert (dropped["image"] | dropped["audio"]).all()  # something always remains
    only_image = ~present["audio"]
    assert dropped["image"][only_image].all()  # a lone context modality is never hidden
    both = present["audio"]
    # kept with p 0.7, plus restored when both would be gone (0.3 * 0.3): 0.79
    assert dropped["image"][both].float().mean().item() == pytest.approx(0.79, abs=0.015)
    assert not (dropped["audio"] & ~present["audio"]).any()  # dropout never invents a modality
