"""gemma_app.media: image and audio decoding, and a clear MediaError for every bad upload."""

import io
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from gemma_app import media
from gemma_app.media import MediaError, MediaLimits

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# -- images ------------------------------------------------------------------------------------


def test_rgb_png_and_jpeg_decode_to_uint8_rgb(tmp_path):
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    for name in ("a.png", "a.jpg", "a.webp", "a.bmp"):
        array = media.load_image(save(image, tmp_path / name))
        assert array.shape == (30, 40, 3) and array.dtype == np.uint8
        assert np.abs(array.astype(int) - [10, 200, 30]).max() <= 8  # lossy formats


def test_transparency_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (media.load_image(save(rgba, tmp_path / "clear.png")) == 255).all()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (media.load_image(save(palette, tmp_path / "p.png", transparency=0)) == 255).all()


@pytest.mark.parametrize(
    "mode, value, expected",
    [("L", 128, 128), ("1", 1, 255), ("I;16", 65535, 255), ("I", 32896, 128), ("CMYK", 0, 255)],
)
def test_other_modes_become_rgb(tmp_path, mode, value, expected):
    suffix = ".jpg" if mode == "CMYK" else ".tif" if mode == "I" else ".png"
    path = save(Image.new(mode, (3, 2), value), tmp_path / f"img{suffix}")
    array = media.load_image(path)
    assert array.shape == (2, 3, 3)
    assert np.abs(array.astype(int) - expected).max() <= 2


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(image, tmp_path / "phone.jpg", exif=exif)
    assert media.load_image(path).shape == (40, 20, 3)


def test_animations_give_their_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    array = media.load_image(path)
    assert tuple(array[0, 0]) == (255, 0, 0)


def test_example_assets_decode():
    for path in sorted(EXAMPLES.glob("*.png")):
        assert media.load_image(path).ndim == 3
    for path in sorted(EXAMPLES.glob("*.wav")):
        samples = media.load_audio(path)
        assert 0.5 < samples.size / 16_000 < 10


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (no pixel data): a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"", "empty.png", "is empty"),
        (b"this is text, not a picture", "notes.png", "not an image file"),
        (png_header_only(9000, 9000), "big.png", "the limit is 40 megapixels"),
        (png_header_only(30000, 30000), "bomb.png", "too many pixels"),
        (png_header_only(64, 64), "nodata.png", "corrupt or truncated"),
    ],
    ids=["empty", "renamed-text", "too-many-pixels", "pil-bomb", "no-pixel-data"],
)
def test_bad_images_raise_media_error(tmp_path, data, name, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MediaError, match=message):
        media.load_image(path)


def test_a_truncated_jpeg_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(MediaError, match="corrupt or truncated"):
        media.load_image(path)


def test_file_size_limit_and_missing_file(tmp_path):
    path = save(Image.new("RGB", (64, 64)), tmp_path / "a.png")
    with pytest.raises(MediaError, match="the limit is 0 MiB"):
        media.load_image(path, MediaLimits(max_file_bytes=10))
    with pytest.raises(MediaError, match="could not be read"):
        media.load_image(tmp_path / "missing.png")


# -- audio -------------------------------------------------------------------------------------


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / samples.size)


@pytest.mark.parametrize("fmt, name", [("WAV", "a.wav"), ("FLAC", "a.flac"), ("OGG", "a.ogg")])
def test_audio_formats_decode_to_16k_mono(tmp_path, fmt, name):
    path = tmp_path / name
    sf.write(path, tone(1.0, 44_100, channels=2), 44_100, format=fmt)
    samples = media.load_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert samples.size == 16_000
    assert abs(peak_hz(samples, 16_000) - 440) < 3


def test_stereo_is_mixed_to_mono(tmp_path):
    left = tone(0.5, 16_000)
    path = tmp_path / "lr.wav"
    sf.write(path, np.stack([left, -left], axis=1), 16_000)  # opposite channels cancel
    assert np.abs(media.load_audio(path)).max() < 1e-3


def test_resample_keeps_frequency_and_length():
    out = media.resample(tone(2.0, 48_000, freq=1000), 48_000, 16_000)
    assert out.size == 32_000 and abs(peak_hz(out, 16_000) - 1000) < 2
    same = np.zeros(10, np.float32)
    assert media.resample(same, 16_000, 16_000) is not None


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x[500:-500], dtype=np.float64))))  # edges aside


def test_resample_keeps_a_1khz_tone_exactly():
    out = media.resample(tone(1.0, 44_100, freq=1000), 44_100, 16_000)  # 0.5 * sin
    assert out.size == 16_000 and out.dtype == np.float32
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    assert np.abs(out - expected)[500:-500].max() < 1e-4  # measured 4.5e-6
    assert abs(peak_hz(out, 16_000) - 1000) < 1.5


@pytest.mark.parametrize("freq", [8_200, 9_000, 15_000])
def test_resample_removes_tones_above_the_new_nyquist(freq):
    out = media.resample(tone(1.0, 44_100, freq=freq), 44_100, 16_000)
    assert rms(out) < 1e-3 * rms(tone(1.0, 44_100, freq=freq))  # no alias left (> 60 dB)


def test_upsampling_adds_no_images():
    out = media.resample(tone(1.0, 8_000, freq=3_000), 8_000, 16_000)
    spectrum = np.abs(np.fft.rfft(out[500:-500]))
    freqs = np.fft.rfftfreq(out.size - 1000, 1 / 16_000)
    assert abs(freqs[np.argmax(spectrum)] - 3_000) < 20
    assert spectrum[freqs > 4_500].max() < 1e-3 * spectrum.max()  # the 5 kHz image is gone


def test_stereo_44k_int16_wav_becomes_mono_16k_float(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = tone(1.0, 44_100, freq=1000), tone(1.0, 44_100, freq=1000)
    sf.write(path, np.stack([left, right * 0.5], axis=1), 44_100, subtype="PCM_16")
    samples = media.load_audio(path)
    assert samples.dtype == np.float32 and samples.shape == (16_000,)
    assert abs(rms(samples) - 0.75 * 0.5 / np.sqrt(2)) < 1e-3  # the channels' mean
    assert abs(peak_hz(samples, 16_000) - 1000) < 1.5


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_every_sample_type_decodes_to_the_same_level(tmp_path, subtype):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, tone(0.5, 16_000), 16_000, subtype=subtype)
    samples = media.load_audio(path)
    np.testing.assert_allclose(
        samples, tone(0.5, 16_000), atol=1e-2 if subtype == "PCM_U8" else 1e-4
    )


def test_float_audio_past_full_scale_is_scaled_down(tmp_path):
    path = tmp_path / "hot.wav"
    sf.write(path, 4 * tone(0.5, 16_000), 16_000, subtype="FLOAT")  # peak 2.0
    samples = media.load_audio(path)
    assert abs(np.abs(samples).max() - 1.0) < 1e-3
    np.testing.assert_allclose(samples, tone(0.5, 16_000) * 2, atol=1e-4)


@pytest.mark.parametrize(
    "fmt, subtype, suffix", [("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")]
)
def test_flac_and_ogg_round_trip_at_16k(tmp_path, fmt, subtype, suffix):
    path = tmp_path / f"clip.{suffix}"
    wave = tone(1.0, 16_000, freq=700)
    sf.write(path, wave, 16_000, format=fmt, subtype=subtype)
    samples = media.load_audio(path)
    assert samples.shape == (16_000,)
    if fmt == "FLAC":  # lossless: only the 16-bit quantisation
        assert np.abs(samples - wave).max() <= 1 / 32768 + 1e-7
    else:  # lossy, but the tone and its level survive
        assert abs(peak_hz(samples, 16_000) - 700) < 1.5 and abs(rms(samples) - rms(wave)) < 0.02


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile < 1.1: no MP3")
def test_mp3_decodes(tmp_path):
    path = tmp_path / "clip.mp3"
    sf.write(path, tone(1.0, 44_100, freq=500, channels=2), 44_100, format="MP3")
    samples = media.load_audio(path)
    assert abs(samples.size - 16_000) < 1_200  # MP3 adds encoder delay / padding
    assert abs(peak_hz(samples, 16_000) - 500) < 2


def test_mp3_without_libsndfile_support_says_so(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp3"
    path.write_bytes(b"ID3" + bytes(100))
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV"})
    with pytest.raises(MediaError, match="MP3 needs libsndfile 1.1 or newer"):
        media.load_audio(path)


def test_too_short_clips_are_refused(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, tone(0.05, 16_000), 16_000)
    with pytest.raises(MediaError, match=r"too short \(50 ms\)"):
        media.load_audio(path)


def test_long_clips_are_refused(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(31 * 8000, np.float32), 8000)
    with pytest.raises(MediaError, match="31.0 s long; the limit is 30 s"):
        media.load_audio(path)


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"", "empty.wav", "is empty"),
        (b"RIFF" + bytes(60), "noise.wav", "not an audio file"),
        ((EXAMPLES / "shapes.png").read_bytes(), "picture.wav", "not an audio file"),
    ],
    ids=["empty", "garbage", "renamed-image"],
)
def test_bad_audio_raises_media_error(tmp_path, data, name, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MediaError, match=message):
        media.load_audio(path)


def test_a_wav_without_frames_is_reported(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), 16_000)
    with pytest.raises(MediaError, match="contains no audio"):
        media.load_audio(path)


# -- classification ----------------------------------------------------------------------------


def test_media_kind_by_suffix_then_by_content(tmp_path):
    assert media.media_kind("x.JPG") == "image" and media.media_kind("x.flac") == "audio"
    image = tmp_path / "upload.bin"
    image.write_bytes((EXAMPLES / "shapes.png").read_bytes())
    assert media.media_kind(image) == "image"
    audio = tmp_path / "upload.dat"
    audio.write_bytes((EXAMPLES / "question_math.wav").read_bytes())
    assert media.media_kind(audio) == "audio"
    assert media.load_media(audio).ndim == 1
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(MediaError, match="neither an image nor an audio file"):
        media.media_kind(text)


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_make_assets_script_makes_decodable_examples(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "scripts/make_assets.py", "--out", str(tmp_path)], cwd=root, check=True,
        capture_output=True, timeout=120,
    )  # fmt: skip
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in EXAMPLES.iterdir())
    # The drawings are deterministic, so the committed files are what the script makes.
    for name in ("shapes.png", "chart.png"):
        assert (media.load_image(tmp_path / name) == media.load_image(EXAMPLES / name)).all()
    for path in tmp_path.glob("*.wav"):
        assert 0.5 < media.load_audio(path).size / 16_000 < 10
