"""Checkpoints: what a path is (:class:`Checkpoint`), key tables, converters, strict loading,
self-describing folders.

Which function for which need: docs/checkpoints.md. :meth:`Checkpoint.open` decides what a
checkpoint is (format, architecture, task, tokenizer, training facts); every entry point loads
weights through :func:`load_pretrained` (into a model) or :func:`load_model` (builds the model
too), which open it.
"""

from oneref.checkpoint.converters import (
    TASKS,
    check_compatible,
    convert_state_dict,
    infer_architecture,
    infer_config,
    resize_vision_positions,
    to_official,
)
from oneref.checkpoint.descriptor import Checkpoint, CheckpointNotFound, resolve_source, same_pieces
from oneref.checkpoint.folder import (
    CheckpointFolder,
    FolderCheck,
    read_folder,
    save_folder,
    validate_folder,
)
from oneref.checkpoint.formats import AUTO, FORMAT_NAMES, FORMATS, RUNNABLE_FORMATS, check_format
from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.keys import key_group, official_keys
from oneref.checkpoint.loading import (
    LoadError,
    build_model,
    load_into,
    load_model,
    load_pretrained,
    read_weights,
)
from oneref.checkpoint.report import ConversionReport

__all__ = [
    "AUTO",
    "FORMATS",
    "FORMAT_NAMES",
    "RUNNABLE_FORMATS",
    "TASKS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFound",
    "CheckpointFolder",
    "ConversionReport",
    "FolderCheck",
    "LoadError",
    "build_model",
    "check_compatible",
    "check_format",
    "convert_state_dict",
    "extract_state_dict",
    "infer_architecture",
    "infer_config",
    "is_lightning_checkpoint",
    "key_group",
    "load_checkpoint_file",
    "load_into",
    "load_model",
    "load_pretrained",
    "official_keys",
    "read_folder",
    "read_weights",
    "resize_vision_positions",
    "resolve_source",
    "same_pieces",
    "save_folder",
    "to_official",
    "validate_folder",
]
