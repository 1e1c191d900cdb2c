"""Decoding real files from other projects and crafted broken ones (pure functions, no Ray)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipelines.data.decode import DecodeSettings, Unusable, decode_audio, decode_image, decode_meta, decode_text
from pipelines.data.wds_reader import read_tar

SETTINGS = DecodeSettings(image_size=64, sample_rate=16000, max_audio_seconds=10.0)


def reason_of(fn, data, settings=SETTINGS) -> str:
    with pytest.raises(Unusable) as caught:
        fn(data, settings)
    return caught.value.reason


def test_rgba_png_becomes_rgb_on_white(fixtures_dir):
    pixels = decode_image((fixtures_dir / "images" / "pug-rgba.png").read_bytes(), SETTINGS)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    source = Image.open(fixtures_dir / "images" / "pug-rgba.png")
    if (np.asarray(source)[..., 3] == 0).any():  # transparent corners turn white, not black
        assert pixels[0, 0].min() > 200


@pytest.mark.parametrize("name", ["coco-000000039769.jpg", "merlion.png", "confusing-pictures.jpg"])
def test_photos_are_resized_and_centre_cropped(fixtures_dir, name):
    pixels = decode_image((fixtures_dir / "images" / name).read_bytes(), SETTINGS)
    assert pixels.shape == (64, 64, 3) and 20 < pixels.mean() < 235


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    pixels = decode_image(buffer.getvalue(), DecodeSettings(image_size=20))
    assert pixels[2, 10, 2] > 150 and pixels[17, 10, 0] > 150  # blue on top, red at the bottom


def test_greyscale_and_webp():
    grey = io.BytesIO()
    Image.new("L", (30, 30), 128).save(grey, format="PNG")
    assert decode_image(grey.getvalue(), SETTINGS)[0, 0].tolist() == [128, 128, 128]
    webp = io.BytesIO()
    Image.new("RGB", (30, 30), (0, 200, 0)).save(webp, format="WEBP", lossless=True)
    assert decode_image(webp.getvalue(), SETTINGS)[5, 5].tolist() == [0, 200, 0]


def test_broken_images_are_unusable(fixtures_dir):
    jpeg = (fixtures_dir / "images" / "coco-000000039769.jpg").read_bytes()
    assert reason_of(decode_image, jpeg[: len(jpeg) // 2]) == "truncated_image"
    assert reason_of(decode_image, b"not an image at all") == "undecodable_image"
    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, format="PNG")
    assert reason_of(decode_image, big.getvalue(), DecodeSettings(max_image_pixels=10_000)) == "image_too_large"


def test_text_is_utf8_nfc_and_capped():
    assert decode_text(b"  a   red\ncircle ", SETTINGS) == "a red circle"
    assert decode_text("Cafe\u0301".encode(), SETTINGS) == "Café"  # NFC
    assert decode_text(("x" * 900).encode(), SETTINGS) == "x" * 512
    assert reason_of(decode_text, b"\xff\xfe bad") == "undecodable_text"
    assert reason_of(decode_text, b"  \n ") == "empty_text"


def test_chinese_transcript_survives_byte_for_byte(fixtures_dir):
    with open(fixtures_dir / "shards" / "wenet-audio-text.tar", "rb") as stream:
        samples = [s for s in read_tar(stream, "wenet", 1 << 26) if isinstance(s, dict)]
    raw = samples[0]["text"]
    assert decode_text(raw, SETTINGS).encode("utf-8") == raw.strip()
    assert "广州市房地产中介协会分析" in decode_text(raw, SETTINGS)


@pytest.mark.parametrize("name", ["LJ002-0020.wav", "LJ002-0035.wav"])
def test_22khz_speech_is_resampled_to_the_model_rate(fixtures_dir, name):
    data = (fixtures_dir / "audio" / name).read_bytes()
    info = sf.info(io.BytesIO(data))
    assert info.samplerate == 22050
    wave, valid = decode_audio(data, SETTINGS)
    assert len(wave) == 160_000 and wave.dtype == np.float32
    assert valid == pytest.approx(info.duration * 16000, abs=2)
    assert not wave[valid:].any()
    # The energy survives resampling (a real resampler, not a crude decimation).
    original, _ = sf.read(io.BytesIO(data), dtype="float32")
    assert np.sqrt(np.mean(wave[:valid] ** 2)) == pytest.approx(np.sqrt(np.mean(original**2)), rel=0.05)


def wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def test_stereo_24bit_audio_becomes_mono_and_is_cropped():
    t = np.arange(48000 * 3) / 48000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1)
    wave, valid = decode_audio(wav(stereo, 48000, "PCM_24"), DecodeSettings(max_audio_seconds=1.0))
    assert (len(wave), valid) == (16000, 16000)
    assert np.abs(wave).max() == pytest.approx(0.25, abs=0.01)  # the mean of the two channels


def test_broken_audio_is_unusable():
    assert reason_of(decode_audio, b"RIFF\x00\x00\x00\x00WAVEjunk") == "bad_audio_header"
    nan = np.full(1000, math.nan, dtype=np.float32)
    assert reason_of(decode_audio, wav(nan, 16000, "FLOAT")) == "nonfinite_audio"
    assert reason_of(decode_audio, wav(np.zeros(0, dtype=np.float32), 16000)) == "empty_audio"


def test_metadata_and_class_labels():
    assert decode_meta(b'{"question": "what colour?", "answer": "red"}', None) == {
        "question": "what colour?",
        "answer": "red",
        "label": "",
    }
    assert decode_meta(None, b"7\n")["label"] == "7"
    with pytest.raises(Unusable, match="Expecting"):
        decode_meta(b"{broken", None)
    with pytest.raises(Unusable) as caught:
        decode_meta(b"[1, 2]", None)
    assert caught.value.reason == "invalid_json"


def jpeg_bytes(size=48) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_random_bytes_behind_a_jpeg_magic_are_undecodable_not_truncated():
    garbage = b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(3000)
    assert reason_of(decode_image, garbage) == "undecodable_image"
    whole = jpeg_bytes()
    assert reason_of(decode_image, whole[:100]) == "undecodable_image"  # cut in the header: unknowable
    assert reason_of(decode_image, whole[:-10]) == "truncated_image"  # header whole, pixels stop early


def test_an_image_under_the_minimum_side_is_too_small():
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny, format="PNG")
    assert reason_of(decode_image, tiny.getvalue()) == "image_too_small"
    allowed = DecodeSettings(image_size=64, min_image_side=1)
    assert decode_image(tiny.getvalue(), allowed).shape == (64, 64, 3)


def flac_of(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as clip:
        for start in range(0, len(samples), rate * 60):
            clip.write(samples[start : start + rate * 60])
    return buffer.getvalue()


def test_an_hour_of_audio_reads_only_the_frames_the_model_uses():
    import tracemalloc

    rate = 8000
    minute = np.zeros(rate * 60, dtype=np.float32)
    minute[: rate // 2] = 0.25  # the first half second of each minute
    data = flac_of(np.tile(minute, 60), rate)  # an hour: 115 MB as float32, ~100 kB as FLAC
    tracemalloc.start()
    wave, valid = decode_audio(data, DecodeSettings(max_audio_seconds=1.0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak} bytes: more than the model's second was read"
    assert (len(wave), valid) == (16000, 16000)
    assert wave[1000:7000].mean() == pytest.approx(0.25, abs=0.01) and abs(wave[9000:15000]).max() < 0.01
    # Past the model's window a float WAV may hold anything: never read, never a reason.
    tail = np.concatenate([np.full(17000, 0.1, np.float32), np.full(16000, np.nan, np.float32)])
    assert decode_audio(wav(tail, 16000, "FLOAT"), DecodeSettings(max_audio_seconds=1.0))[1] == 16000


def test_a_flac_cut_mid_frame_is_truncated_audio():
    t = np.arange(16000) / 16000
    data = flac_of((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    assert reason_of(decode_audio, data[: len(data) // 2]) == "truncated_audio"


@pytest.mark.parametrize(
    "meta, field",
    [({"question": ["what"]}, "question"), ({"answer": {"a": 1}}, "answer"), ({"label": True}, "label")],
)
def test_json_fields_of_the_wrong_type_are_invalid(meta, field):
    import json

    with pytest.raises(Unusable, match=f"{field} must be a string or a number") as caught:
        decode_meta(json.dumps(meta).encode(), None)
    assert caught.value.reason == "invalid_json"
    assert decode_meta(b'{"question": "how many?", "answer": 0, "label": 3}', None) == {
        "question": "how many?",
        "answer": "0",
        "label": "3",
    }
