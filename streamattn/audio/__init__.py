"""Speech: Whisper tiny.en loaded offline from a PyPI package, audio files, the offline baseline,
and streaming transcription (chunked encoder with caches, incremental decoding)."""

from streamattn.audio.decoding import Word
from streamattn.audio.features import LogMelStream, log_mel
from streamattn.audio.metrics import wer
from streamattn.audio.streaming import StreamingTranscriber, context_policy, whisper_encoder
from streamattn.audio.whisper import load_audio, load_whisper, transcribe_offline

__all__ = [
    "LogMelStream",
    "StreamingTranscriber",
    "Word",
    "context_policy",
    "load_audio",
    "load_whisper",
    "log_mel",
    "transcribe_offline",
    "wer",
    "whisper_encoder",
]
