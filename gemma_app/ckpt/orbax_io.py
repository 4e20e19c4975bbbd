"""Orbax checkpoints on disk: find them, read their metadata, restore leaves, write fixtures.

Restoring never holds two full copies of the weights. Orbax restores a *partial* tree per
batch of leaves (`partial_restore=True`) straight into the target dtype and device
(`ArrayRestoreArgs(dtype=, sharding=)`, so bf16-on-disk to fp32 or back is a per-leaf cast
inside orbax); the largest leaves come first, while little else is resident, and batches are
capped at `BATCH_BYTES`, so the transient host copy of a batch stays small next to the model.
Encoder weights are never read at all in text-only mode: they are simply not in the batch.
With vision loading, the image-encoder leaves are restored straight into float32 (`dtypes`)
while the text leaves take the requested dtype, still one leaf copy at a time.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma_app.ckpt import layouts
from gemma_app.ckpt.errors import CorruptCheckpointError, MissingFilesError, brief
from gemma_app.ckpt.progress import ProgressFn, format_bytes
from gemma_app.jax_utils import release_freed_host_memory

logger = logging.getLogger(__name__)

# Upper bound of one restore call (target bytes). Small enough that the batch's transient
# host buffers are a few % of a 1B model, large enough that per-call overhead (~10 ms) is
# negligible: a 1B model restores in ~30 calls.
BATCH_BYTES = 128 * 2**20
_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")

Plan = list[tuple[str, layouts.Source]]


def is_checkpoint_dir(path: pathlib.Path) -> bool:
    """True if `path` looks like an orbax checkpoint directory (has one of its marker files)."""
    return path.is_dir() and any((path / name).exists() for name in _MARKERS)


def find_checkpoint_dir(path: pathlib.Path, preferred: str = "") -> pathlib.Path:
    """The orbax checkpoint in `path`: `path/preferred`, `path` itself or its only sub-dir.

    A Kauldron checkpoint keeps its params in `default/` next to a `_CHECKPOINT_METADATA`
    without `_METADATA`; that sub-directory is returned.

    Raises:
      MissingFilesError: none found; the message lists what the directory holds.
    """
    path = pathlib.Path(path)
    if preferred and is_checkpoint_dir(path / preferred):
        return find_checkpoint_dir(path / preferred)
    if is_checkpoint_dir(path):
        if not (path / "_METADATA").exists() and is_checkpoint_dir(path / "default"):
            return path / "default"
        return path
    children = [p for p in sorted(path.iterdir()) if is_checkpoint_dir(p)] if path.is_dir() else []
    if len(children) == 1:
        return find_checkpoint_dir(children[0])
    found = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
    expected = f"'{preferred}/' or " if preferred else ""
    raise MissingFilesError(
        f"No orbax checkpoint in {path}: expected {expected}a directory with _METADATA "
        f"(an orbax checkpoint). Found: {found or 'an empty directory'}."
    )


def _walk(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _walk(value, (*prefix, str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _walk(value, (*prefix, str(i)))
    else:
        yield prefix, tree


def read_leaves(ckpt_dir: pathlib.Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """Key path -> (shape, dtype) of every array in the checkpoint, from its metadata only.

    Raises:
      CorruptCheckpointError: the metadata is missing or unreadable.
    """
    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(ckpt_dir).tree
    except Exception as error:  # orbax raises FileNotFoundError, ValueError, JSON errors...
        raise CorruptCheckpointError(
            f"Cannot read the orbax metadata of {ckpt_dir} ({brief(error)}). "
            "The checkpoint is incomplete or damaged: delete it and download or copy it again."
        ) from error
    return {
        key: (tuple(meta.shape), meta.dtype)
        for key, meta in _walk(tree)
        if getattr(meta, "shape", None) is not None
    }


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _batches(plan: Plan, dtype_of: Callable[[str], Any]) -> list[Plan]:
    """Largest leaves first; STACKED leaves grouped by stored array; each batch <= BATCH_BYTES."""
    by_key: dict[tuple[str, ...], Plan] = {}
    for path, source in plan:
        by_key.setdefault(source.key, []).append((path, source))

    def nbytes(group: Plan) -> int:
        return sum(_nbytes(s.shape, dtype_of(p)) for p, s in group)

    groups = sorted(by_key.values(), key=lambda g: -nbytes(g))
    batches: list[Plan] = []
    size = BATCH_BYTES
    for group in groups:
        group_bytes = nbytes(group)
        if size + group_bytes > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].extend(group)
        size += group_bytes
    return batches


def _set(tree: dict, key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        tree = tree.setdefault(part, {})
    tree[key[-1]] = value


def _get(tree: Mapping, key: tuple[str, ...]) -> Any:
    for part in key:
        tree = tree[part]
    return tree


def _restore_batch(
    checkpointer, ckpt_dir, batch: Plan, dtype_of: Callable[[str], Any], sharding
) -> dict[str, jax.Array]:
    """One partial restore. Stacked arrays come back as numpy and are split per layer."""
    item, restore_args = {}, {}
    for path, source in batch:
        dtype = dtype_of(path)
        if source.index is None:
            item_leaf = jax.ShapeDtypeStruct(source.shape, dtype, sharding=sharding)
            args = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=source.shape)
        else:  # whole stacked array on the host, then one device copy per layer slice
            item_leaf = jax.ShapeDtypeStruct((0,), dtype)
            args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        _set(item, source.key, item_leaf)
        _set(restore_args, source.key, args)
    restore = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    restored = checkpointer.restore(ckpt_dir, args=restore)
    out = {}
    for path, source in batch:
        leaf = _get(restored, source.key)
        out[path] = leaf if source.index is None else jax.device_put(leaf[source.index], sharding)
    return out


def restore(
    ckpt_dir: pathlib.Path,
    plan: Plan,
    dtype,
    progress: ProgressFn,
    *,
    label: str = "",
    dtypes: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Reads the leaves of `plan` into device arrays of `dtype`, batch by batch.

    Args:
      ckpt_dir: the orbax checkpoint directory.
      plan: (our path, Source) for every leaf to read.
      dtype: target dtype of every leaf (orbax casts per leaf).
      progress: `(message, fraction)` within this phase.
      label: model name for progress messages.
      dtypes: our path -> target dtype for leaves that differ from `dtype` (the image
        encoder's float32 leaves).

    Raises:
      CorruptCheckpointError: a data file is missing, truncated or damaged.
    """
    overrides = dict(dtypes or {})

    def dtype_of(path: str):
        return overrides.get(path, dtype)

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    total = sum(_nbytes(s.shape, dtype_of(p)) for p, s in plan) or 1
    done, arrays = 0, {}
    progress(f"Loading {label} weights ({format_bytes(total)})", 0.0)
    for batch in _batches(plan, dtype_of):
        try:
            arrays.update(_restore_batch(checkpointer, ckpt_dir, batch, dtype_of, sharding))
        except Exception as error:  # tensorstore/orbax raise many types for damaged data
            names = ", ".join(path for path, _ in batch[:3])
            raise CorruptCheckpointError(
                f"Cannot read {names}{'...' if len(batch) > 3 else ''} from {ckpt_dir} "
                f"({brief(error)}). The checkpoint files are "
                "truncated or damaged: delete the directory and download or copy it again."
            ) from error
        # Each leaf passed through a host buffer freed once the device copy exists; pages
        # between live arrays stay resident until trimmed (1B: ~0.3 GB by the end).
        release_freed_host_memory()
        done += sum(_nbytes(s.shape, dtype_of(p)) for p, s in batch)
        progress(
            f"Loading {label} weights: {format_bytes(done)} / {format_bytes(total)}", done / total
        )
    return arrays


def save(path: pathlib.Path, flat: Mapping[str, Any], layout: str, *, pattern_len: int = 1) -> None:
    """Writes our '/'-joined leaves as an orbax checkpoint in `layout` (fixtures, benchmarks).

    KAULDRON is written the way Kauldron does: the tree in `path/default/`, and a
    `_CHECKPOINT_METADATA` (no `_METADATA`) in `path` itself.
    """
    path = pathlib.Path(path)
    tree = layouts.to_layout(flat, layout, pattern_len=pattern_len)
    target = path / "default" if layout == layouts.KAULDRON else path
    ocp.PyTreeCheckpointer().save(target, tree)
    if layout == layouts.KAULDRON:
        (path / "_CHECKPOINT_METADATA").write_text("{}")
