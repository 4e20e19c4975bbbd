"""Released Gemma checkpoints on Kaggle: name -> handle, files inside the download, preset.

Facts from google-deepmind/gemma `docs/checkpoints.md` and spec §3: a Flax download holds
the orbax checkpoint in a sub-directory named after the variation (`gemma3-4b-it/`,
`gemma2-2b/`, `2b-it/` for Gemma 1) next to `tokenizer.model`. Entries marked
`verified=False` come from third-party code only (Gemma 3 270M, every Gemma 4 handle);
the loader does not rely on their sub-directory name (it also finds a lone checkpoint
directory, or one at the root).

Gemma 4 (E2B, E4B, 31B, 26B-A4B; pt and it) is UNVERIFIED: Google's docs only say Flax
checkpoints "will be updated on Kaggle when possible" (spec §3). The handles
`google/gemma-4/flax/gemma-4-{e2b,e4b,31b,26b-a4b}[-it]`, the orbax checkpoint at the download
root and `tokenizer.model` next to it come from third-party code. A Gemma 4 variant is
supported once its preset (`gemma4-e2b`, ...) exists in `gemma_app.nn.presets.PRESETS`.

A version is pinned with `name@N` (or `name/N`, or a full `owner/model/framework/variation/N`
handle). kagglehub asks the Kaggle API for the newest version of an unpinned handle on every
start, even when the files are cached; a pinned one starts offline from the cache.

Usage:
    ref = resolve_kaggle("gemma3-4b-it@1")
    ref.pinned_handle  # "google/gemma-3/flax/gemma3-4b-it/1"
"""

from __future__ import annotations

import dataclasses
import difflib
import re

KAGGLE_WEB = "https://www.kaggle.com"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One released checkpoint.

    Attributes:
      name: what users type, e.g. "gemma3-4b-it".
      family: Gemma generation, 1..4.
      handle: unversioned Kaggle handle `owner/model/framework/variation`.
      preset: name in `gemma_app.nn.presets`; None where the engine has no architecture yet.
      instruction_tuned: True for the chat ("-it") checkpoints.
      checkpoint_dir: orbax directory inside the download; "" means the download root.
      tokenizer_file: SentencePiece model inside the download.
      multimodal: the checkpoint also holds the image encoder (loaded unless text_only).
      verified: handle and layout confirmed by Google's own docs.
    """

    name: str
    family: int
    handle: str
    preset: str | None
    instruction_tuned: bool
    checkpoint_dir: str
    tokenizer_file: str = "tokenizer.model"
    multimodal: bool = False
    verified: bool = True

    @property
    def model_page(self) -> str:
        """The Kaggle page where the Gemma licence is accepted, e.g. .../models/google/gemma-3."""
        return kaggle_model_page(self.handle)

    @property
    def supported(self) -> bool:
        """The engine has this architecture (its preset is registered)."""
        from gemma_app.nn import presets  # late: presets grow while families are added

        return self.preset is not None and (
            self.preset in presets.PRESETS or self.preset in presets.TINY_PRESETS
        )


def kaggle_model_page(handle: str) -> str:
    owner, model = handle.split("/")[:2]
    return f"{KAGGLE_WEB}/models/{owner}/{model}"


def _gemma1(size: str, tuned: str, prefix: str = "") -> Variant:
    variation = f"{prefix}{size}{tuned}"  # "2b", "2b-it", "1.1-7b-it"
    return Variant(
        name=f"gemma{prefix.rstrip('-') or '1'}-{size}{tuned}",
        family=1,
        handle=f"google/gemma/flax/{variation}",
        preset=f"gemma1-{size}",
        instruction_tuned=bool(tuned),
        checkpoint_dir=variation,
    )


def _gemma2(size: str, tuned: str) -> Variant:
    variation = f"gemma2-{size}{tuned}"
    return Variant(
        name=variation,
        family=2,
        handle=f"google/gemma-2/flax/{variation}",
        preset=f"gemma2-{size}",
        instruction_tuned=bool(tuned),
        checkpoint_dir=variation,
    )


def _gemma3(size: str, tuned: str) -> Variant:
    verified = size != "270m"  # 270M: handle seen in third-party code only (spec §3)
    variation = f"gemma3-{size}{tuned}" if verified else f"gemma-3-{size}{tuned}"
    return Variant(
        name=f"gemma3-{size}{tuned}",
        family=3,
        handle=f"google/gemma-3/flax/{variation}",
        preset=f"gemma3-{size}",
        instruction_tuned=bool(tuned),
        checkpoint_dir=variation,
        multimodal=size not in ("270m", "1b"),
        verified=verified,
    )


def _gemma4(size: str, tuned: str) -> Variant:
    # Unverified (see the module docstring): third-party code puts the orbax checkpoint at
    # the download root, next to tokenizer.model. Every size has the image encoder; E2B/E4B
    # also the audio encoder (both loaded unless text_only).
    return Variant(
        name=f"gemma4-{size}{tuned}",
        family=4,
        handle=f"google/gemma-4/flax/gemma-4-{size}{tuned}",
        preset=f"gemma4-{size}",
        instruction_tuned=bool(tuned),
        checkpoint_dir="",
        multimodal=True,
        verified=False,
    )


def _all_variants() -> list[Variant]:
    variants = [_gemma1(s, t) for s in ("2b", "7b") for t in ("", "-it")]
    variants += [_gemma1(s, "-it", prefix="1.1-") for s in ("2b", "7b")]
    variants += [_gemma2(s, t) for s in ("2b", "9b", "27b") for t in ("", "-it")]
    variants += [_gemma3(s, t) for s in ("270m", "1b", "4b", "12b", "27b") for t in ("", "-it")]
    variants += [_gemma4(s, t) for s in ("e2b", "e4b", "26b-a4b", "31b") for t in ("", "-it")]
    return variants


VARIANTS: dict[str, Variant] = {v.name: v for v in _all_variants()}


@dataclasses.dataclass(frozen=True)
class KaggleRef:
    """A Kaggle model to download: its handle, optional pinned version, known variant."""

    handle: str
    version: int | None
    variant: Variant | None

    @property
    def pinned_handle(self) -> str:
        return self.handle if self.version is None else f"{self.handle}/{self.version}"


_PIN = re.compile(r"^(?P<name>.+?)(?:[@/](?P<version>\d+))?$")


def resolve_kaggle(spec: str) -> KaggleRef | None:
    """A variant name (`gemma3-4b-it`, `gemma3-4b-it@2`) or handle (4 or 5 parts), else None.

    A full handle that is not in the registry is still returned (variant None): the loader
    then infers the architecture from the checkpoint's shapes.
    """
    spec = spec.removeprefix("kaggle:")
    match = _PIN.match(spec)
    name, version = match["name"], match["version"] and int(match["version"])
    if name in VARIANTS:
        variant = VARIANTS[name]
        return KaggleRef(variant.handle, version, variant)
    parts = spec.split("/")
    if all(parts) and (len(parts) == 4 or (len(parts) == 5 and parts[4].isdigit())):
        handle = "/".join(parts[:4])
        version = int(parts[4]) if len(parts) == 5 else None
        known = {v.handle.lower(): v for v in VARIANTS.values()}
        return KaggleRef(handle, version, known.get(handle.lower()))
    return None


def suggest(name: str) -> list[str]:
    """Variant names close to a mistyped `name`."""
    return difflib.get_close_matches(name, list(VARIANTS), n=4, cutoff=0.6)
