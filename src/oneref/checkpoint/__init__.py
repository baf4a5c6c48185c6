"""Checkpoints: key tables, converters, strict loading, self-describing folders.

Which function for which need: docs/checkpoints.md. Every entry point loads weights through
:func:`load_pretrained` (into a model) or :func:`load_model` (builds the model too).
"""

from oneref.checkpoint.converters import (
    CHECKPOINT_FORMATS,
    TASKS,
    check_compatible,
    convert_state_dict,
    infer_architecture,
    infer_config,
    resize_vision_positions,
    to_official,
)
from oneref.checkpoint.folder import (
    CheckpointFolder,
    FolderCheck,
    read_folder,
    save_folder,
    validate_folder,
)
from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.keys import key_group, official_keys
from oneref.checkpoint.loading import (
    SOURCE_FORMATS,
    LoadError,
    build_model,
    load_into,
    load_model,
    load_pretrained,
    read_weights,
)
from oneref.checkpoint.report import ConversionReport

__all__ = [
    "CHECKPOINT_FORMATS",
    "SOURCE_FORMATS",
    "TASKS",
    "CheckpointError",
    "CheckpointFolder",
    "ConversionReport",
    "FolderCheck",
    "LoadError",
    "build_model",
    "check_compatible",
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
    "save_folder",
    "to_official",
    "validate_folder",
]
