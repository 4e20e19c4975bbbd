"""User-facing errors of weight loading: each message says what went wrong and what to do.

Every class derives from `WeightsError`, so the app catches one type and shows `str(error)`
as is (a banner or `gr.Error`); no stack trace is needed to understand the problem.

    try:
        engine = load_engine("gemma3-4b-it")
    except WeightsError as error:
        show_banner(str(error))
"""

from __future__ import annotations


def brief(error: BaseException, limit: int = 240) -> str:
    """A library exception as one short line, to quote inside our messages."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class WeightsError(Exception):
    """Base class: the weights could not be obtained or do not fit the model."""


class NoCredentialsError(WeightsError):
    """Kaggle needs credentials and none were found (env vars, kaggle.json, access_token)."""


class AccessDeniedError(WeightsError):
    """HTTP 401/403: the Gemma licence is not accepted, or the credentials are not valid."""


class ModelNotFoundError(WeightsError):
    """HTTP 404, or a model name that is neither a known variant, a handle nor a path."""


class DownloadError(WeightsError):
    """The download failed for another reason (network down, server error)."""


class MissingFilesError(WeightsError):
    """A directory lacks a file the loader needs (checkpoint, tokenizer, config.json...)."""


class CorruptCheckpointError(WeightsError):
    """Files exist but cannot be read: truncated, damaged or not what their name says."""


class UnsupportedModelError(WeightsError):
    """A real Gemma checkpoint this engine cannot run (int4, an unknown encoder, no preset)."""


class CheckpointMismatchError(WeightsError, ValueError):
    """A checkpoint does not fit the model config; `problems` lists every issue at once.

    Attributes:
      problems: one line per missing, unexpected or wrongly shaped/typed tensor.
      looks_like: the preset whose shapes the checkpoint matches, when one does.
    """

    def __init__(self, what: str, problems: list[str], *, looks_like: str | None = None):
        self.problems = problems
        self.looks_like = looks_like
        lines = "\n  ".join(problems)
        # The hint goes first: with hundreds of mismatched layers it is what the user needs.
        hint = f" This checkpoint looks like {looks_like}." if looks_like else ""
        super().__init__(f"{what}: {len(problems)} problem(s).{hint}\n  {lines}")
