"""Speech: Whisper tiny.en loaded offline from a PyPI package, audio files, and the offline transcription baseline."""

from streamattn.audio.whisper import load_audio, load_whisper, transcribe_offline

__all__ = [
    "load_audio",
    "load_whisper",
    "transcribe_offline",
]
