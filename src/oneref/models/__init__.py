from oneref.models.beit3 import BEiT3, BEiT3Config
from oneref.models.oneref import MLP, OneRef, OneRefConfig
from oneref.models.registry import SIZES, create_model, model_config
from oneref.models.runtime import ModelRuntime

__all__ = [
    "BEiT3",
    "BEiT3Config",
    "MLP",
    "ModelRuntime",
    "OneRef",
    "OneRefConfig",
    "SIZES",
    "create_model",
    "model_config",
]
