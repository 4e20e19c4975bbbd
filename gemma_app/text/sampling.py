"""Sampling strategies: pure functions `(logits [B, V] float32, rng) -> tokens [B] int32`.

The public names follow google-deepmind/gemma `gm.text` (`Greedy`, `RandomSampling`,
`TopkSampling`, `TopPSampling`) plus `MinPSampling`, `TopkTopPSampling` and `make_sampling`,
which maps the UI's slider values to a method.

Every method is a frozen dataclass registered as a JAX pytree whose numeric fields are
*leaves*. A jitted decode step that takes the method as an ordinary (non-static) argument
therefore compiles once per method class; moving a slider between turns only changes leaf
values and never recompiles. Construction validates concrete values and normalises them to
Python `float`/`int`, so `p=1` and `p=0.9` share one abstract signature (weak float32).

Forbidden tokens are the caller's job (their logits are already -inf). Every method here
treats -inf as "probability zero": such tokens are never drawn and never produce NaN.

Speed on a 262144-entry vocab on CPU (see `bench/sampling_bench.py`) drives three choices:

* `jax.random.categorical` over the whole vocab costs ~5-9 ms (a gumbel draw per entry and a
  slow variadic argmax), so full-vocab draws go through `_categorical`, an exact two-level
  draw (pick a block of `_BLOCK` tokens by its log-mass, then a token inside it).
* Top-k uses `lax.top_k` with the static candidate cap `MAX_TOP_K`; `k` stays a dynamic
  leaf and candidates with rank >= k are masked out.
* Top-p reads its cut-off from the top `MAX_TOP_K` candidates. Only when their mass is below
  p (or the cut ties with the last candidate) does an in-graph `lax.cond` fall back to an
  exact bisection over the float32 bit patterns of the full vocab (~3 ms); a full sort would
  be ~75 ms per token.

Example:
    sampling = make_sampling(greedy=False, temperature=0.7, top_k=64, top_p=0.95, min_p=0)
    tokens = jax.jit(lambda m, l, r: m(l, r))(sampling, logits, jax.random.key(0))
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "MAX_TOP_K",
    "Greedy",
    "MinPSampling",
    "RandomSampling",
    "SamplingMethod",
    "TopPSampling",
    "TopkSampling",
    "TopkTopPSampling",
    "make_sampling",
]

# Static number of candidates `lax.top_k` extracts. It bounds `k` (k is a traced leaf, but
# `lax.top_k` needs a static size) and is the top-p fast path's window. 1024 costs ~1.2 ms on a
# 262144 vocab on CPU, while covering any practical k and most nucleus sizes.
MAX_TOP_K = 1024

# Block size of the two-level categorical draw; 512 * 512 = 262144 (the Gemma 3 vocab).
_BLOCK = 512


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Range:
    """An interval of allowed values for one parameter (NaN is never inside)."""

    low: float
    high: float
    low_inclusive: bool
    high_inclusive: bool
    integer: bool = False

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_inclusive else x > self.low
        below = x <= self.high if self.high_inclusive else x < self.high
        return bool(above and below) and (not self.integer or float(x).is_integer())

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"


_TEMPERATURE = _Range(0.0, math.inf, low_inclusive=False, high_inclusive=False)
_TOP_P = _Range(0.0, 1.0, low_inclusive=False, high_inclusive=True)
_MIN_P = _Range(0.0, 1.0, low_inclusive=True, high_inclusive=False)
_TOP_K = _Range(1, MAX_TOP_K, low_inclusive=True, high_inclusive=True, integer=True)


def _is_concrete_number(value: object) -> bool:
    """True for values known at construction time.

    A method may be built with tracers (inside jit/vmap) or placeholders (`None`, `object()`,
    shardings, axis specs); none of those may be validated.
    """
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, int | float | np.number | np.ndarray | jax.Array)


def _checked(owner: str, name: str, value: object, allowed: _Range) -> object:
    """Validates a concrete scalar and returns it as a Python int/float."""
    if not _is_concrete_number(value):
        return value
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"{owner}.{name} must be a scalar, got shape {array.shape}.")
    number = float(array)
    if number not in allowed:
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}.")
    # One Python type per field, whatever was passed (int, numpy or concrete jax scalar): jit
    # then sees the same weak-typed aval for `1`, `0.9` and `np.float32(0.5)`.
    return int(number) if allowed.integer else number


# ---------------------------------------------------------------------------------------------
# Methods.
# ---------------------------------------------------------------------------------------------


class SamplingMethod(abc.ABC):
    """Base class: a pure `(logits, rng) -> tokens` strategy with validated numeric leaves."""

    _RANGES: ClassVar[dict[str, _Range]] = {}

    def __post_init__(self) -> None:
        for name, allowed in self._RANGES.items():
            value = _checked(type(self).__name__, name, getattr(self, name), allowed)
            object.__setattr__(self, name, value)  # Normalising our own init, not mutating.

    @abc.abstractmethod
    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """Samples one token per row.

        Args:
          logits: [B, V] next-token logits (float32; -inf marks forbidden tokens).
          rng: a `jax.random` key.

        Returns:
          [B] int32 token ids.
        """


def _pytree_dataclass(cls: type) -> type:
    """Frozen dataclass whose fields are all pytree leaves (dynamic under jit).

    A plain pytree node, not `jax.tree_util.register_dataclass`: in jax 0.10.2 the treedefs of
    two such dataclasses with the same field names compare equal whatever their classes, so a
    jit cache whose hash buckets met could run `TopPSampling`'s executable for a `MinPSampling`
    (seen as a flaky test: min-p drew like top-p). Unflattening bypasses `__init__`: leaves may
    be tracers, and the values were validated when the method was made.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))

    def unflatten(_, leaves):
        method = object.__new__(cls)
        for name, leaf in zip(names, leaves, strict=True):
            object.__setattr__(method, name, leaf)
        return method

    def flatten(method):
        return [getattr(method, name) for name in names], None

    def flatten_with_keys(method):
        leaves, aux = flatten(method)
        return list(zip(map(jax.tree_util.GetAttrKey, names), leaves, strict=True)), aux

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


@_pytree_dataclass
class Greedy(SamplingMethod):
    """Always the most likely token (lowest id on ties, like `jnp.argmax`)."""

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        del rng
        return _argmax(logits.astype(jnp.float32))


@_pytree_dataclass
class RandomSampling(SamplingMethod):
    """Samples from `softmax(logits / temperature)` over the whole vocab.

    Attributes:
      temperature: > 0; divides the logits.
    """

    temperature: float = 1.0
    _RANGES: ClassVar[dict[str, _Range]] = {"temperature": _TEMPERATURE}

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        return _categorical(rng, _scale(logits, self.temperature))


@_pytree_dataclass
class TopkSampling(SamplingMethod):
    """Samples among the k most likely tokens (ties at rank k: lowest ids win).

    Attributes:
      k: integer in [1, MAX_TOP_K]; `k=1` is greedy (the default, as in gemma `gm.text`).
      temperature: > 0; divides the logits.
    """

    k: int = 1
    temperature: float = 1.0
    _RANGES: ClassVar[dict[str, _Range]] = {"k": _TOP_K, "temperature": _TEMPERATURE}

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        values, ids = _top_k(logits.astype(jnp.float32), self.k)
        # Scaling after the top-k touches C values instead of V; the order is unchanged.
        return _categorical_among(rng, values / self.temperature, ids)


@_pytree_dataclass
class TopPSampling(SamplingMethod):
    """Nucleus sampling, with the cut-off rule of gemma `gm.text.TopPSampling`.

    Keeps the smallest set of most likely tokens whose probability mass reaches p, including
    the token that crosses p and every token tied with it, then renormalises.

    Attributes:
      p: in (0, 1]; `p=1` keeps every token.
      temperature: > 0; divides the logits before the probabilities are computed.
    """

    p: float = 0.9
    temperature: float = 1.0
    _RANGES: ClassVar[dict[str, _Range]] = {"p": _TOP_P, "temperature": _TEMPERATURE}

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        scaled = _scale(logits, self.temperature)
        cut = _nucleus_cut(scaled, self.p)
        return _categorical(rng, jnp.where(scaled >= cut, scaled, -jnp.inf))


@_pytree_dataclass
class MinPSampling(SamplingMethod):
    """Keeps tokens with `prob >= p * max_prob` (after temperature), then renormalises.

    Attributes:
      p: in [0, 1); `p=0` keeps every token.
      temperature: > 0; divides the logits before the probabilities are computed.
    """

    p: float = 0.05
    temperature: float = 1.0
    _RANGES: ClassVar[dict[str, _Range]] = {"p": _MIN_P, "temperature": _TEMPERATURE}

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        scaled = _scale(logits, self.temperature)
        # prob_i >= p * prob_max  <=>  l_i >= l_max + log(p), which needs no softmax; log(0) is
        # -inf, so p=0 keeps everything.
        floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(self.p)
        return _categorical(rng, jnp.where(scaled >= floor, scaled, -jnp.inf))


@_pytree_dataclass
class TopkTopPSampling(SamplingMethod):
    """Top-k, renormalised over those k tokens, then top-p (same rule as `TopPSampling`).

    Attributes:
      k: integer in [1, MAX_TOP_K].
      p: in (0, 1].
      temperature: > 0; divides the logits.
    """

    k: int
    p: float
    temperature: float = 1.0
    _RANGES: ClassVar[dict[str, _Range]] = {
        "k": _TOP_K,
        "p": _TOP_P,
        "temperature": _TEMPERATURE,
    }

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        values, ids = _top_k(logits.astype(jnp.float32), self.k)  # [B, C], sorted
        values = values / self.temperature
        # The k survivors are already sorted, so the nucleus needs no extra top-k or sort;
        # normalising by their own log-mass is the renormalisation between the two filters.
        log_mass = jax.nn.logsumexp(values, axis=-1, keepdims=True)
        cut, _ = _cut_from_sorted(values, log_mass, self.p)
        cut = jnp.where(self.p >= 1.0, -jnp.inf, cut)
        return _categorical_among(rng, jnp.where(values >= cut, values, -jnp.inf), ids)


# ---------------------------------------------------------------------------------------------
# Kernels. Shapes: B = batch, V = vocab, C = min(MAX_TOP_K, V) candidates, N = V / _BLOCK.
# ---------------------------------------------------------------------------------------------


def _scale(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    return logits.astype(jnp.float32) / temperature


def _blocks(x: jax.Array) -> jax.Array:
    """[B, V] -> [B, N, _BLOCK], padding the vocab with -inf (never drawn, never the max)."""
    batch, vocab = x.shape
    pad = -vocab % _BLOCK
    x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return x.reshape(batch, -1, _BLOCK)


def _argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` in two levels: XLA:CPU's variadic argmax over 262144 is ~1.2 ms."""
    if x.shape[-1] <= _BLOCK:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    blocks = _blocks(x)
    block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # [B], first block with the max
    return _global_id(block, jnp.argmax(_pick(blocks, block), axis=-1))


def _categorical(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """Exact draw from `softmax(logits)` per row, in two levels.

    P(block) * P(token | block) = softmax(logits), but only ~2 * sqrt(V) gumbels are drawn
    instead of V: ~0.2 ms instead of ~5-9 ms for `jax.random.categorical` on 262144 logits.
    """
    if logits.shape[-1] <= _BLOCK:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    block_rng, token_rng = jax.random.split(rng)
    blocks = _blocks(logits)
    block = jax.random.categorical(block_rng, jax.nn.logsumexp(blocks, axis=-1))  # [B]
    return _global_id(block, jax.random.categorical(token_rng, _pick(blocks, block)))


def _pick(blocks: jax.Array, block: jax.Array) -> jax.Array:
    """[B, N, _BLOCK] blocks, [B] block index -> [B, _BLOCK] the chosen block of each row."""
    return jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]


def _global_id(block: jax.Array, offset: jax.Array) -> jax.Array:
    return (block * _BLOCK + offset).astype(jnp.int32)


def _categorical_among(rng: jax.Array, values: jax.Array, ids: jax.Array) -> jax.Array:
    """Draws from `softmax(values)` [B, C] and maps the winner back to its vocab id."""
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _candidates(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The C largest values per row, sorted descending, and their ids."""
    return lax.top_k(x, min(MAX_TOP_K, x.shape[-1]))


def _top_k(x: jax.Array, k: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """The C candidates with every rank >= k masked to -inf; k may be traced."""
    values, ids = _candidates(x)
    rank = lax.broadcasted_iota(jnp.int32, values.shape, 1)
    return jnp.where(rank < k, values, -jnp.inf), ids


def _cut_from_sorted(
    values: jax.Array, log_mass: jax.Array, p: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The gemma top-p cut-off read from descending logits.

    Args:
      values: [B, C] logits sorted in descending order (a prefix of the row, or all of it).
      log_mass: [B, 1] log of the normaliser (logsumexp of the full row).
      p: nucleus mass.

    Returns:
      cut: [B, 1] the logit of the first token whose cumulative probability reaches p;
        tokens with logit >= cut form the nucleus (so ties with it are kept).
      crossed: [B, 1] whether p was reached within these C values.
    """
    below = jnp.cumsum(jnp.exp(values - log_mass), axis=-1) < p  # [B, C]
    n_below = jnp.sum(below, axis=-1, keepdims=True)
    index = jnp.minimum(n_below, values.shape[-1] - 1)
    return jnp.take_along_axis(values, index, axis=-1), n_below < values.shape[-1]


def _nucleus_cut(x: jax.Array, p: float | jax.Array) -> jax.Array:
    """[B, 1] top-p cut-off over the full row x [B, V]: top-C fast path, exact fallback."""
    log_mass = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    values, _ = _candidates(x)
    cut, crossed = _cut_from_sorted(values, log_mass, p)
    keep_all = p >= 1.0  # Rounding may leave the cumsum just under 1; p=1 must keep all.
    if values.shape[-1] < x.shape[-1]:
        # Not `values[:, -1:]`: XLA folds that slice into the top-k's own slice, which then
        # no longer matches its TopK rewrite and becomes a full sort (~60 ms instead of ~1 ms).
        smallest = jnp.min(values, axis=-1, keepdims=True)
        # Tokens outside the candidates are all <= smallest. If the cut equals it, ties beyond
        # the window belong to the nucleus, so the window is not enough.
        exact = keep_all | jnp.all(crossed & (cut > smallest))
        cut = lax.cond(exact, lambda: cut, lambda: _bisect_cut(x, log_mass, p, smallest))
    return jnp.where(keep_all, -jnp.inf, cut)


def _bisect_cut(
    x: jax.Array, log_mass: jax.Array, p: float | jax.Array, upper: jax.Array
) -> jax.Array:
    """Exact top-p cut-off without sorting V entries.

    The gemma cut is the largest logit value t with mass(x >= t) >= p. mass(x >= t) only
    decreases as t grows, so bisection over the order-preserving uint32 keys of float32
    finds t exactly in <= 32 passes of O(V) (~3 ms for V = 262144, versus ~75 ms to sort).

    Args:
      x: [B, V] scaled logits.
      log_mass: [B, 1] logsumexp of x.
      p: nucleus mass.
      upper: [B, 1] a value >= the cut (the smallest top-C candidate).

    Returns:
      [B, 1] the cut, as a float32 logit.
    """
    probs = jnp.exp(x - log_mass)
    keys = _order_key(x)
    # Invariant: key(cut) in [lo, hi). Every token has x >= min(x), so mass(>= lo) = 1 >= p.
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = _order_key(upper) + 1

    def unfinished(bounds):
        lo, hi = bounds
        return jnp.any(hi - lo > 1)

    def halve(bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # uint32: hi >= lo, so no overflow.
        mass = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True)
        return jnp.where(mass >= p, mid, lo), jnp.where(mass >= p, hi, mid)

    lo, _ = lax.while_loop(unfinished, halve, (lo, hi))
    return _from_order_key(lo)


_SIGN = np.uint32(0x80000000)


def _order_key(x: jax.Array) -> jax.Array:
    """Maps float32 to uint32 so that integer order equals float order (-0.0 as +0.0)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    # Negative floats: larger magnitude is smaller, so flip every bit; positives: set the sign.
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _from_order_key(key: jax.Array) -> jax.Array:
    """Inverse of `_order_key`."""
    bits = jnp.where(key >= _SIGN, key & ~_SIGN, ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


# ---------------------------------------------------------------------------------------------
# UI mapping.
# ---------------------------------------------------------------------------------------------


def make_sampling(
    *,
    greedy: bool = False,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> SamplingMethod:
    """Maps the UI's slider values to a sampling method.

    A filter is off when its value is None or neutral: `top_k` 0, `top_p` 1.0, `min_p` 0.
    `greedy=True` or `temperature == 0` gives `Greedy()` and ignores the filters.

    Args:
      greedy: always take the most likely token.
      temperature: >= 0; None means 1.0.
      top_k: keep the k most likely tokens (integer in [1, MAX_TOP_K]), or off.
      top_p: nucleus mass in (0, 1], or off.
      min_p: relative probability floor in [0, 1), or off.

    Returns:
      `Greedy`, `RandomSampling`, `TopkSampling`, `TopPSampling`, `TopkTopPSampling` or
      `MinPSampling`.

    Raises:
      ValueError: a value is outside its range, or min_p is combined with top_k/top_p (no
        method implements that chain; silently dropping a filter would hide the choice).
    """
    temperature = 1.0 if temperature is None else temperature
    if greedy or temperature == 0:
        return Greedy()
    use_k = top_k not in (None, 0)
    use_p = top_p is not None and top_p != 1.0
    use_min_p = min_p not in (None, 0)
    if use_min_p and (use_k or use_p):
        raise ValueError(
            f"min_p={min_p} cannot be combined with top_k={top_k} or top_p={top_p}; "
            "turn min_p off (0) or turn top_k (0) and top_p (1.0) off."
        )
    if use_min_p:
        return MinPSampling(p=min_p, temperature=temperature)
    if use_k and use_p:
        return TopkTopPSampling(k=top_k, p=top_p, temperature=temperature)
    if use_k:
        return TopkSampling(k=top_k, temperature=temperature)
    if use_p:
        return TopPSampling(p=top_p, temperature=temperature)
    return RandomSampling(temperature=temperature)
