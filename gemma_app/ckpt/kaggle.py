"""Kaggle downloads through kagglehub, with progress and user-facing errors.

`download` is the only function in the project that calls kagglehub (`translate_error` only
imports its exception classes, to tell them apart).

kagglehub 1.0.2 keeps its cache in `$KAGGLEHUB_CACHE` (default `~/.cache/kagglehub`) as
`models/<owner>/<model>/<framework>/<variation>/<version>/` plus a completion marker
`models/<owner>/<model>/<framework>/<variation>/<version>.complete`; a pinned handle whose
marker exists resolves without any network call or credentials. `install_into_cache` writes
that layout (fixtures and air-gapped machines).

kagglehub does not raise for missing credentials when downloading models: it calls the API
anonymously and gets HTTP 401/403. `translate_error` therefore decides "no credentials" vs
"licence not accepted" by checking the same places kagglehub reads (`credentials_source`).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import threading
from collections.abc import Iterator
from http import HTTPStatus

from gemma_app.ckpt import errors, registry
from gemma_app.ckpt.errors import brief
from gemma_app.ckpt.progress import ProgressFn, format_bytes

POLL_SECONDS = 0.25


def credentials_source() -> str | None:
    """Where kagglehub will find Kaggle credentials (its lookup order), or None."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "the KAGGLE_API_TOKEN environment variable"
    for name in ("access_token", "access_token.txt"):
        token = pathlib.Path.home() / ".kaggle" / name
        if token.is_file() and token.read_text().strip():
            return str(token)
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "the KAGGLE_USERNAME and KAGGLE_KEY environment variables"
    kaggle_json = _kaggle_json()
    return str(kaggle_json) if kaggle_json.is_file() else None


def _kaggle_json() -> pathlib.Path:
    folder = os.environ.get("KAGGLE_CONFIG_DIR") or pathlib.Path.home() / ".kaggle"
    return pathlib.Path(folder) / "kaggle.json"


def _no_credentials_message(ref: registry.KaggleRef) -> str:
    page = registry.kaggle_model_page(ref.handle)
    return (
        f"Kaggle credentials are needed to download {ref.pinned_handle} and none were found. "
        "Create an API token at https://www.kaggle.com/settings (API > Create New Token), "
        "then either set KAGGLE_API_TOKEN=<token>, or set KAGGLE_USERNAME and KAGGLE_KEY, "
        f"or save kaggle.json as {_kaggle_json()} (on Hugging Face Spaces: add them as "
        f"Secrets). The account must also have accepted the Gemma licence at {page}."
    )


def _access_denied_message(ref: registry.KaggleRef, status: int, source: str) -> str:
    page = registry.kaggle_model_page(ref.handle)
    return (
        f"Kaggle refused access to {ref.pinned_handle} (HTTP {status}). Gemma is gated: sign in "
        f"to Kaggle with the account of your credentials, open {page} and accept the Gemma "
        f'licence ("Request access"), then try again. If you did, check the credentials '
        f"(read from {source}): an expired or mistyped token also gives this error."
    )


def cached_versions(cache_root: pathlib.Path, handle: str) -> list[int]:
    """Versions of `handle` completely downloaded in a kagglehub cache (by their markers)."""
    folder = cache_root / "models" / handle
    if not folder.is_dir():
        return []
    stems = (p.name.removesuffix(".complete") for p in folder.glob("*.complete"))
    return sorted(int(stem) for stem in stems if stem.isdigit())


def _offline_hint(ref: registry.KaggleRef, cache_root: pathlib.Path) -> str:
    if ref.version is not None:
        return ""
    name = ref.variant.name if ref.variant else ref.handle
    versions = cached_versions(cache_root, ref.handle)
    have = f" Versions cached here: {versions}." if versions else ""
    return (
        f" An unpinned name asks Kaggle for the newest version on every start; pin one to "
        f"start offline from the cache, e.g. {name}@{versions[-1] if versions else 1}.{have}"
    )


def translate_error(
    error: Exception, ref: registry.KaggleRef, cache_root: pathlib.Path
) -> errors.WeightsError:
    """Turns a kagglehub/requests exception into one of our user-facing errors."""
    import requests
    from kagglehub import exceptions as kaggle_errors

    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    source = credentials_source()
    if isinstance(error, kaggle_errors.UnauthenticatedError | kaggle_errors.CredentialError):
        return errors.NoCredentialsError(_no_credentials_message(ref))
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        if source is None:
            return errors.NoCredentialsError(_no_credentials_message(ref))
        return errors.AccessDeniedError(_access_denied_message(ref, status, source))
    if status == HTTPStatus.NOT_FOUND:
        known = ", ".join(v.name for v in registry.VARIANTS.values() if v.supported)
        return errors.ModelNotFoundError(
            f"Kaggle has no model {ref.pinned_handle} (HTTP 404). Check the handle and version "
            f"at {registry.kaggle_model_page(ref.handle)}. Known variants: {known}."
        )
    if isinstance(error, kaggle_errors.DataCorruptionError):
        return errors.CorruptCheckpointError(
            f"The download of {ref.pinned_handle} is corrupted (checksum mismatch, {brief(error)}). "
            "kagglehub removed the bad file; run again to download it anew."
        )
    if isinstance(error, ValueError) and "credentials" in str(error):
        return errors.NoCredentialsError(
            f"{brief(error)}. Fix or delete that file, or set KAGGLE_API_TOKEN instead."
        )
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return errors.DownloadError(
            f"Could not reach Kaggle to get {ref.pinned_handle} ({type(error).__name__})."
            + _offline_hint(ref, cache_root)
        )
    detail = f"HTTP {status}" if status else type(error).__name__
    return errors.DownloadError(
        f"Downloading {ref.pinned_handle} failed ({detail}; {brief(error)})."
    )


def _dir_bytes(path: pathlib.Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # files come and go while kagglehub works
                total += os.stat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def _watch_download(
    folder: pathlib.Path, expected: int | None, label: str, progress: ProgressFn
) -> Iterator[None]:
    """Reports bytes arriving under `folder` from a polling thread while the block runs.

    kagglehub shows tqdm bars on the terminal only; its byte counts are not exposed, so the
    app's callback is fed from the growth of the download directory instead.
    """
    stop = threading.Event()
    start = _dir_bytes(folder)

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            done = _dir_bytes(folder) - start
            if done > 0:
                fraction = min(0.99, done / expected) if expected else 0.0
                progress(f"Downloading {label}: {format_bytes(done)}", fraction)

    thread = threading.Thread(target=poll, name="download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def download(
    ref: registry.KaggleRef, progress: ProgressFn, *, expected_bytes: int | None = None
) -> pathlib.Path:
    """Downloads `ref` with kagglehub (or finds it in its cache); the only kagglehub call.

    Args:
      ref: the handle, optional pinned version and registry entry.
      progress: `(message, fraction)` within the download phase.
      expected_bytes: approximate download size, to turn bytes into a fraction.

    Returns:
      The directory kagglehub returns (checkpoint sub-directory + tokenizer.model).

    Raises:
      WeightsError: NoCredentialsError, AccessDeniedError, ModelNotFoundError,
        CorruptCheckpointError or DownloadError, each with what to do about it.
    """
    import kagglehub
    import requests
    from kagglehub import exceptions as kaggle_errors

    cache_root = pathlib.Path(kagglehub.config.get_cache_folder())
    progress(f"Fetching {ref.pinned_handle} from Kaggle (cache: {cache_root})", 0.0)
    failures = (
        requests.RequestException,
        kaggle_errors.DataCorruptionError,
        kaggle_errors.UnauthenticatedError,
        kaggle_errors.CredentialError,
        kaggle_errors.BackendError,
        ValueError,
    )
    try:
        with _watch_download(
            cache_root / "models" / ref.handle, expected_bytes, ref.handle, progress
        ):
            path = kagglehub.model_download(ref.pinned_handle)
    except failures as error:
        raise translate_error(error, ref, cache_root) from error
    progress(f"{ref.pinned_handle} is in {path}", 1.0)
    return pathlib.Path(path)


def install_into_cache(
    cache_root: pathlib.Path, handle: str, version: int, files: pathlib.Path
) -> pathlib.Path:
    """Copies a model directory into a kagglehub cache as a complete download of `handle/version`.

    `kagglehub.model_download(f"{handle}/{version}")` with `KAGGLEHUB_CACHE=cache_root` then
    returns the copy without touching the network (kagglehub 1.0.2 layout, see module doc).
    """
    base = pathlib.Path(cache_root) / "models" / handle
    target = base / str(version)
    shutil.copytree(files, target, dirs_exist_ok=True)
    (base / f"{version}.complete").touch()
    return target
