"""Checkpoints: safe loading, official converters, self-describing folders.

See docs/checkpoints.md. Every entry point loads weights through :func:`load_pretrained`.
"""

from oneref.checkpoint.folder import (
    CheckpointFolder,
    FolderCheck,
    build_model,
    load_model,
    load_pretrained,
    read_folder,
    read_weights,
    save_folder,
    validate_folder,
)
from oneref.checkpoint.io import (
    CheckpointError,
    extract_state_dict,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from oneref.checkpoint.official import (
    NAME_MAP,
    LoadError,
    check_compatible,
    convert_beit3_pretrained,
    convert_mrefm,
    convert_official_oneref,
    infer_architecture,
    infer_config,
    load_into,
    official_keys,
    resize_vision_positions,
    to_official,
)
from oneref.checkpoint.report import ConversionReport

__all__ = [
    "NAME_MAP",
    "CheckpointError",
    "CheckpointFolder",
    "ConversionReport",
    "FolderCheck",
    "LoadError",
    "build_model",
    "check_compatible",
    "convert_beit3_pretrained",
    "convert_mrefm",
    "convert_official_oneref",
    "extract_state_dict",
    "infer_architecture",
    "infer_config",
    "is_lightning_checkpoint",
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
