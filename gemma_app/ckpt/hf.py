"""Hugging Face Gemma checkpoints: `config.json` + safetensors + `tokenizer.model`.

The architecture comes from `config.json` (`hf_map.config_from_hf`); tensors are read one
at a time (each `safe_open` is closed again, so no file stays memory-mapped), converted to
our layout by `hf_map.hf_tensors_to_params`, cast and moved to the device before the next
one is read. Sharded checkpoints (`model.safetensors.index.json`) are supported. With
`text_only=False` a `Gemma3ForConditionalGeneration` checkpoint also gives its SigLIP tower and
projector (`hf_map.hf_vision_tensors_to_params`), converted to float32.

Gemma 4 (`Gemma4ForConditionalGeneration` / `Gemma4ForCausalLM`) goes through `hf_map4`'s
rules the same way: one leaf at a time, every name and shape checked first, and with
`text_only=False` the image and audio towers + projections as float32.

A repo id (`google/gemma-3-1b-it`) is fetched with `huggingface_hub.snapshot_download`
(token from `HF_TOKEN` or `huggingface-cli login`; gated repos need the licence accepted on
their page). Tests exercise local directories only.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy

from gemma_app.ckpt import errors, hf_config4, hf_map, hf_map4, layouts, validate
from gemma_app.ckpt.errors import brief
from gemma_app.ckpt.progress import ProgressFn, format_bytes
from gemma_app.nn.config import TransformerConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
# HF keeps Gemma 4's image soft-token budget in the processor's config, not in config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
SNAPSHOT_PATTERNS = [CONFIG_FILE, INDEX_FILE, "*.safetensors", TOKENIZER_FILE, *PROCESSOR_FILES]


def is_hf_dir(path: pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


def read_config_json(model_dir: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise errors.MissingFilesError(f"No {CONFIG_FILE} in {model_dir}.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise errors.CorruptCheckpointError(
            f"{path} is not valid JSON ({brief(error)})."
        ) from error


def read_config(model_dir: pathlib.Path) -> TransformerConfig:
    """Our config for a HF directory (named "hf-gemma1/2/3", see `hf_map.config_from_hf`)."""
    config_json = read_config_json(model_dir)
    try:
        if hf_config4.is_gemma4(config_json):
            config = hf_config4.config_from_hf(config_json)
            budget = image_soft_token_budget(model_dir)
            if budget is not None and config.vision is not None:
                vision = dataclasses.replace(config.vision, max_soft_tokens=budget)
                config = dataclasses.replace(config, vision=vision)
            return config
        return hf_map.config_from_hf(config_json)
    except (ValueError, KeyError, TypeError) as error:
        raise errors.UnsupportedModelError(
            f"{pathlib.Path(model_dir) / CONFIG_FILE}: {error}"
        ) from error


def image_soft_token_budget(model_dir: pathlib.Path) -> int | None:
    """`max_soft_tokens` of the image processor saved next to the weights, if any.

    `processor_config.json` nests it under "image_processor"; `preprocessor_config.json` holds
    the image processor's keys at the top level. None when neither file names it (the config
    reader then uses HF's default, 280).
    """
    for name in PROCESSOR_FILES:
        path = pathlib.Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise errors.CorruptCheckpointError(
                f"{path} is not valid JSON ({brief(error)})."
            ) from error
        for table in (data.get("image_processor") or {}, data):
            value = table.get("max_soft_tokens") if isinstance(table, dict) else None
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise errors.CorruptCheckpointError(
                        f"{path}: max_soft_tokens must be a positive integer, got {value!r}."
                    )
                return value
    return None


def _shard_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise errors.CorruptCheckpointError(
            f"{index} is not a valid index ({brief(error)})."
        ) from error
    missing = [name for name in names if not (model_dir / name).is_file()]
    if missing:
        raise errors.MissingFilesError(
            f"{model_dir} lacks {len(missing)} of the {len(names)} shards named in {INDEX_FILE}: "
            f"{', '.join(missing)}. The download is incomplete: fetch the missing files."
        )
    return [model_dir / name for name in names]


def tensor_index(model_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, tuple[int, ...]]]:
    """HF tensor name -> (file, shape), from the safetensors headers only."""
    index = {}
    for file in _shard_files(pathlib.Path(model_dir)):
        try:
            with safetensors.safe_open(file, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    index[name] = (file, tuple(f.get_slice(name).get_shape()))
        except (safetensors.SafetensorError, OSError) as error:
            raise errors.CorruptCheckpointError(
                f"Cannot read {file} ({brief(error)}). The file is truncated or damaged: download it again."
            ) from error
    return index


def _reader(index: Mapping[str, tuple[pathlib.Path, tuple[int, ...]]]):
    def read(name: str) -> np.ndarray:
        file = index[name][0]
        try:
            with safetensors.safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except (safetensors.SafetensorError, OSError) as error:
            raise errors.CorruptCheckpointError(
                f"Cannot read {name} from {file} ({brief(error)})."
            ) from error

    return read


def has_vision(index: Mapping[str, Any]) -> bool:
    """True if the checkpoint (its `tensor_index`) holds vision-tower or projector tensors."""
    return hf_map.has_hf_vision(index) or any(n.startswith("model.embed_vision.") for n in index)


def has_audio(index: Mapping[str, Any]) -> bool:
    """True if the checkpoint (its `tensor_index`) holds Gemma 4 audio-tower tensors."""
    return any(n.startswith((hf_map4.AUDIO_PREFIX, "model.embed_audio.")) for n in index)


def _is_encoder_leaf(path: str) -> bool:
    return layouts.is_vision_path(path) or layouts.is_audio_path(path)


def load_params(
    model_dir: pathlib.Path,
    config: TransformerConfig,
    *,
    dtype,
    progress: ProgressFn,
    label: str = "",
    text_only: bool = True,
    index: Mapping[str, tuple[pathlib.Path, tuple[int, ...]]] | None = None,
) -> dict[str, Any]:
    """Reads a HF safetensors checkpoint into our tree of device arrays.

    Text weights become `dtype`. With text_only=False and `config.vision` set, the vision
    tower and projector are loaded too, as float32 (`vision_encoder/...`,
    `embedder/mm_*`); otherwise they are skipped unread.

    Args:
      index: the checkpoint's `tensor_index`, when the caller has it already.

    Raises:
      CheckpointMismatchError: names/shapes do not fit `config`: text and vision problems
        listed together, before any tensor is read.
      CorruptCheckpointError / MissingFilesError: unreadable or missing shards.
    """
    index = tensor_index(model_dir) if index is None else index
    shapes = {name: shape for name, (_, shape) in index.items()}
    read = _reader(index)
    if config.family == 4:
        return _load_gemma4(shapes, read, config, dtype, progress, label, text_only)
    load_vision = validate.loads_vision(config, text_only)
    hf_map.check_hf_tensors(shapes, read, config, vision=load_vision)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sizes = hf_map.param_shapes(config).values()
    total = sum(int(np.prod(shape)) for shape in sizes) * np.dtype(dtype).itemsize
    total += validate.vision_bytes(config) if load_vision else 0
    done = 0
    progress(f"Loading {label} weights ({format_bytes(total)})", 0.0)

    def convert(path: str, leaf: np.ndarray) -> jax.Array:
        nonlocal done
        target = validate.VISION_DTYPE if layouts.is_vision_path(path) else dtype
        array = jax.device_put(leaf.astype(target, copy=False), sharding)
        done += array.nbytes
        progress(f"Loading {label} weights: {format_bytes(done)}", done / total)
        return array

    params = hf_map.hf_tensors_to_params(shapes, read, config, convert=convert)
    if load_vision:
        tower = hf_map.hf_vision_tensors_to_params(shapes, read, config, convert=convert)
        params["vision_encoder"] = tower["vision_encoder"]
        params["embedder"].update(tower["embedder"])
    return params


def _load_gemma4(shapes, read, config, dtype, progress: ProgressFn, label: str, text_only: bool):
    """`load_params` for Gemma 4: `hf_map4` rules, checked first, converted leaf by leaf."""
    vision, audio = (
        validate.loads_vision(config, text_only),
        validate.loads_audio(config, text_only),
    )
    prefix, problems = hf_map4.check(shapes, config, vision=vision, audio=audio)
    if prefix is None:
        raise errors.CheckpointMismatchError("Not a Gemma 4 text checkpoint", problems)
    embedding = f"{prefix}embed_tokens.weight"
    if (
        "lm_head.weight" in shapes
        and not any(embedding in p for p in problems)
        and not np.array_equal(read("lm_head.weight"), read(embedding))
    ):
        problems.append("lm_head.weight differs from embed_tokens: our model ties them")
    if problems:
        raise errors.CheckpointMismatchError(
            f"HF checkpoint does not match {config.name}", problems
        )
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rules = hf_map4.rules(config, vision=vision, audio=audio)

    def target(path: str) -> np.dtype:
        return validate.VISION_DTYPE if _is_encoder_leaf(path) else np.dtype(dtype)

    total = sum(int(np.prod(r.our_shape)) * target(r.ours).itemsize for r in rules) or 1
    done, flat = 0, {}
    progress(f"Loading {label} weights ({format_bytes(total)})", 0.0)
    for rule in rules:
        arrays = [read(hf_map4.hf_name(name, prefix)) for name in rule.hf]
        leaf = hf_map4.convert_rule(rule, arrays)
        flat[rule.ours] = jax.device_put(leaf.astype(target(rule.ours), copy=False), sharding)
        done += flat[rule.ours].nbytes
        progress(f"Loading {label} weights: {format_bytes(done)}", done / total)
    return hf_map.unflatten_params(flat)


def snapshot(repo_id: str, progress: ProgressFn) -> pathlib.Path:
    """Downloads (or finds in the HF cache) the files of `repo_id` that the loader needs."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    progress(f"Fetching {repo_id} from Hugging Face", 0.0)
    page = f"https://huggingface.co/{repo_id}"
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS)
    except hub_errors.GatedRepoError as error:
        raise errors.AccessDeniedError(
            f"{repo_id} is gated: accept the Gemma licence at {page} while signed in, then set "
            "HF_TOKEN to a token of that account (or run `huggingface-cli login`)."
        ) from error
    except hub_errors.RepositoryNotFoundError as error:
        raise errors.ModelNotFoundError(
            f"Hugging Face has no repo {repo_id} (or it is private: set HF_TOKEN)."
        ) from error
    except (hub_errors.LocalEntryNotFoundError, OSError) as error:
        raise errors.DownloadError(f"Could not download {repo_id} ({brief(error)}).") from error
    progress(f"{repo_id} is in {path}", 1.0)
    return pathlib.Path(path)


def save(
    model_dir: pathlib.Path,
    state_dict: Mapping[str, np.ndarray],
    config_json: Mapping[str, Any],
    *,
    shards: int = 1,
) -> None:
    """Writes a HF-layout checkpoint: config.json + safetensors (+ index when sharded).

    For fixtures and conversions; `state_dict` comes from `hf_map.params_to_hf`.
    """
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(json.dumps(config_json, indent=2))
    names = list(state_dict)
    if shards == 1:
        safetensors.numpy.save_file(dict(state_dict), model_dir / "model.safetensors")
        return
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state_dict[name] for name in names[k::shards]}
        safetensors.numpy.save_file(part, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in state_dict.values())},
        "weight_map": weight_map,
    }
    (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
