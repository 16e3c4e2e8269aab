"""The one disk cache: where it lives, keys, atomic writes, file hashes, checked safetensors.

Every cache of the toolkit (reference features, neural fields, inner-neuron patches, CLIP
vocabulary embeddings, zero-shot weights, neuron-label activations ...) goes through here:

- ``cache_dir()``: ``$VITAL_CACHE`` or ``~/.cache/vital``.
- ``key(spec)``: a short hash of a JSON-able spec of what the cached value depends on.
- ``atomic_write(path, write)``: write through a temp file + rename, so a crash or a full disk
  never leaves half a file that a later run would trust.
- ``file_sha256`` / ``files_digest``: content hashes (names do not matter).
- ``load_tensors`` / ``store_tensors``: safetensors with a JSON sidecar holding a SHA-256 of the
  tensors' bytes; a corrupt, truncated or mismatching entry is reported, deleted and ``None`` is
  returned, so the caller rebuilds it. A failed store warns and goes on uncached.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

# Part of every key: raise it when the layout or meaning of cached values changes, so entries
# of an older toolkit are simply not found (instead of being read as something else).
FORMAT = 2

__all__ = ["FORMAT", "cache_dir", "key", "atomic_write", "write_json", "file_sha256", "files_digest",
           "tensors_digest", "load_tensors", "store_tensors"]


def cache_dir(*parts: str) -> Path:
    """``$VITAL_CACHE`` (default ``~/.cache/vital``), or a sub-folder of it."""
    root = Path(os.environ.get("VITAL_CACHE", Path.home() / ".cache" / "vital"))
    return root.joinpath(*parts)


def key(spec, length: int = 32) -> str:
    """A stable hash of a JSON-able spec (dict keys sorted): the name of a cache entry."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``; on any error the temp file is removed
    and the error re-raised (the old ``path``, if any, is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """JSON, atomically (see ``atomic_write``)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths) -> str:
    """SHA-256 over the files' contents (names do not matter, order does)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a dict of tensors (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def load_tensors(path: str | os.PathLike, expect: set[str] | None = None,
                 what: str = "cache entry") -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, metadata) of an entry written by ``store_tensors``; ``None`` when it is missing,
    or corrupt (then it is deleted with a warning). ``expect``: the tensor names it must hold."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    meta_path = _sidecar(path)
    if not path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(path))
        if tensors_digest(tensors) != meta["sha256"]:
            raise ValueError("content hash mismatch")
        if expect is not None and set(tensors) != set(expect):
            raise ValueError(f"holds {sorted(tensors)}, expected {sorted(expect)}")
        return tensors, meta
    except (OSError, ValueError, KeyError, TypeError, SafetensorError,
            json.JSONDecodeError) as err:
        warnings.warn(f"{what} {path} is corrupt ({err}); rebuilding it", stacklevel=2)
        path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None


def store_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  meta: dict | None = None, what: str = "cache entry") -> bool:
    """Write tensors (safetensors) and a JSON sidecar with their SHA-256 and ``meta``, both
    atomically. A full or read-only disk warns and returns False: the run goes on uncached."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        write_json(_sidecar(path), {"sha256": tensors_digest(tensors), **(meta or {})})
        return True
    except OSError as err:
        path.unlink(missing_ok=True)
        warnings.warn(f"could not write {what} {path}: {err}", stacklevel=2)
        return False
