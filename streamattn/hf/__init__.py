"""transformers integration (the only part of streamattn that imports transformers)."""

from streamattn.hf.loading import SHIPPED_MODELS, load_model

__all__ = ["SHIPPED_MODELS", "load_model"]
