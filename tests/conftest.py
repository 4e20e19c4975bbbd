"""Shared pytest fixtures."""

from pathlib import Path

import pytest

from gemma_app.text.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_MODEL = ASSETS / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The project's demo SentencePiece tokenizer (`assets/tokenizer.model`), Gemma 3 layout."""
    return Tokenizer(TOKENIZER_MODEL, version=3)


@pytest.fixture(scope="session")
def demo_engine():
    """The built-in demo engine (tiny Gemma 3 architecture, random weights, our tokenizer)."""
    from gemma_app.engine import demo_engine

    return demo_engine()
