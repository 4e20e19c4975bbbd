"""Makes the UI's example media in assets/examples/: drawn images and spoken clips.

Everything is made here, so the repository ships no third-party media:

* images are drawn with PIL (shapes, a bar chart, and a wide timeline strip for the
  any-aspect-ratio image path of Gemma 4);
* speech is synthesised with espeak-ng (`apt-get install -y espeak-ng`), converted to
  16 kHz mono 16-bit WAV (the rate of the Gemma audio encoders).

Usage:
    python scripts/make_assets.py            # writes assets/examples/*
    python scripts/make_assets.py --check    # verifies the files decode within the app's limits
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma_app import media  # noqa: E402

OUT = ROOT / "assets" / "examples"
SAMPLE_RATE = 16_000

FONT = ImageFont.load_default(size=20)  # Pillow's bundled font: same glyphs everywhere

SPEECH = {
    "question_capital.wav": "What is the capital of France?",
    "question_math.wav": "What is seven times eight?",
}


def draw_shapes(path: Path) -> None:
    """Three coloured shapes on a light background: easy to describe and to count."""
    image = Image.new("RGB", (512, 384), (246, 244, 238))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 110, 190, 260), fill=(220, 50, 47), outline=(60, 60, 60), width=3)
    draw.rectangle((200, 120, 330, 250), fill=(38, 139, 210), outline=(60, 60, 60), width=3)
    draw.polygon([(410, 105), (480, 265), (340, 265)], fill=(133, 153, 0), outline=(60, 60, 60))
    draw.text((20, 20), "red circle, blue square, green triangle", fill=(60, 60, 60), font=FONT)
    image.save(path, optimize=True)


def draw_chart(path: Path) -> None:
    """A labelled bar chart: a question about values needs reading the picture."""
    values = {"Mon": 3, "Tue": 7, "Wed": 5, "Thu": 9, "Fri": 4}
    image = Image.new("RGB", (512, 384), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 16), "Cups of coffee per day", fill="black", font=FONT)
    base, left, width, gap, unit = 340, 50, 60, 28, 30
    draw.line((left - 10, base, 500, base), fill="black", width=2)
    for i, (day, value) in enumerate(values.items()):
        x = left + i * (width + gap)
        draw.rectangle((x, base - value * unit, x + width, base), fill=(108, 113, 196))
        draw.text((x + 12, base + 8), day, fill="black", font=FONT)
        draw.text((x + 24, base - value * unit - 26), str(value), fill="black", font=FONT)
    image.save(path, optimize=True)


def draw_timeline(path: Path) -> None:
    """A wide 1024x160 strip (6.4:1): Gemma 4 keeps the aspect ratio, Gemma 3 squashes it."""
    events = {1969: "Moon landing", 1989: "Web", 2007: "Smartphone", 2017: "Transformer"}
    image = Image.new("RGB", (1024, 160), (250, 250, 246))
    draw = ImageDraw.Draw(image)
    left, right, y = 40, 984, 90

    def x_of(year: int) -> int:
        return left + (year - 1960) * (right - left) // (2025 - 1960)

    draw.line((left, y, right, y), fill=(60, 60, 60), width=3)
    for year, label in events.items():
        x = x_of(year)
        draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=(203, 75, 22))
        draw.text((x - 22, y + 14), str(year), fill="black", font=FONT)
        draw.text((x - 50, y - 44), label, fill=(38, 139, 210), font=FONT)
    image.save(path, optimize=True)


def speak(text: str, path: Path) -> None:
    """espeak-ng -> WAV at its own rate -> 16 kHz mono PCM-16 (deterministic for one version)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        samples, rate = sf.read(raw, dtype="float32", always_2d=True)
    mono = media.resample(samples.mean(axis=1), rate, SAMPLE_RATE)
    mono = 0.9 * mono / max(float(np.abs(mono).max()), 1e-6)  # normalise the level
    sf.write(path, mono, SAMPLE_RATE, subtype="PCM_16")


def make_all(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "shapes.png", out / "chart.png", out / "timeline.png"]
    draw_shapes(paths[0])
    draw_chart(paths[1])
    draw_timeline(paths[2])
    for name, text in SPEECH.items():
        speak(text, out / name)
        paths.append(out / name)
    return paths


def check(out: Path = OUT) -> None:
    """Every example decodes within the app's default limits."""
    for path in sorted(out.iterdir()):
        array = media.load_media(path)
        print(f"{path.name}: {media.media_kind(path)} {array.shape} {array.dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the existing files")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (assets/examples)")
    args = parser.parse_args()
    if not args.check:
        for path in make_all(args.out):
            print(f"wrote {path.name} ({path.stat().st_size:,} bytes)")
    check(args.out)


if __name__ == "__main__":
    main()
