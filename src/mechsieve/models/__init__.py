"""Model loading (folder, hub id, GGUF alias) and hook points per architecture."""

from mechsieve.models.hooks import ARCHITECTURES, HookPoints, hook_points
from mechsieve.models.loading import (
           DEFAULT_MODEL,
           LoadedModel,
           ModelConfig,
           ModelError,
           load_model,
           load_tokenizer,
)

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "HookPoints", "LoadedModel", "ModelConfig", "ModelError",
           "hook_points", "load_model", "load_tokenizer"]
