"""transformers integration (the only part of streamattn that imports transformers)."""

from streamattn.hf.cache import StreamingCache, StreamingLayer, rope_from_config
from streamattn.hf.loading import SHIPPED_MODELS, load_model
from streamattn.hf.stream import Stream

__all__ = ["SHIPPED_MODELS", "Stream", "StreamingCache", "StreamingLayer", "load_model", "rope_from_config"]
