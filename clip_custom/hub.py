"""CLIPs on the Hugging Face hub (`hf-hub:ORG/REPO`), through huggingface_hub's cache.

huggingface_hub decides where files live and whether the network may be used (HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE). An open_clip-layout file is preferred (no conversion), then a
transformers one.
"""
import functools
import json
import socket
from urllib.parse import urlparse

from .convert import from_transformers, is_transformers_layout, open_clip_arch, transformers_arch
from .download import DownloadError, sha256_file
from .files import read_weight_file
from .model import check_is_clip

PREFIX = "hf-hub:"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                "model.safetensors", "pytorch_model.bin")


def _hub():
    import huggingface_hub
    from huggingface_hub import constants
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub.utils import EntryNotFoundError
    return huggingface_hub.hf_hub_download, EntryNotFoundError, constants


@functools.lru_cache(maxsize=None)
def unreachable(endpoint: str, timeout: float = 5.0) -> str:
    """'' when the hub's host answers a TCP connection within ``timeout`` s, else why not.
    Checked once per process: without it an offline machine waits for every file's download
    retries (about 100 s) before it fails."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return ""
    except OSError as err:
        return f"{host}:{port} does not answer ({err.strerror or err})"


def _offline_reason(constants) -> str:
    return "" if constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)


def _where(constants) -> str:
    if constants.HF_HUB_OFFLINE:
        return f"the local cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set)"
    reason = _offline_reason(constants)
    if reason:
        return (f"the local cache {constants.HF_HUB_CACHE} (the hub cannot be reached: "
                f"{reason}; connect to the network or copy the files into that cache)")
    return f"the hub and the local cache {constants.HF_HUB_CACHE}"


def _fetch(repo_id: str, filename: str):
    """Local path of repo_id/filename, or None when the repo has no such file."""
    download, not_found, constants = _hub()
    try:
        return download(repo_id=repo_id, filename=filename,
                        local_files_only=bool(_offline_reason(constants)))
    except not_found:
        return None
    except Exception as err:
        raise DownloadError(f"cannot fetch {filename} of {PREFIX}{repo_id} from {_where(constants)}: "
                           f"{type(err).__name__}: {err}") from err


def _first_weight_file(repo_id: str) -> str:
    for filename in WEIGHT_FILES:
        path = _fetch(repo_id, filename)
        if path:
            return path
    raise DownloadError(f"{PREFIX}{repo_id}: none of {', '.join(WEIGHT_FILES)} found in "
                       f"{_where(_hub()[2])}")


def _json(repo_id: str, filename: str) -> dict | None:
    path = _fetch(repo_id, filename)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def repo_id_of(spec: str) -> str:
    repo_id = spec[len(PREFIX):]
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"bad hub spec {spec!r}: expected {PREFIX}ORG/REPO")
    return repo_id


def load_hub(spec: str) -> tuple[dict, str, dict]:
    """(OpenAI-layout state dict, SHA-256 of the weight file, build_model keyword arguments)."""
    repo_id = repo_id_of(spec)
    path = _first_weight_file(repo_id)
    state_dict = read_weight_file(path)
    if is_transformers_layout(state_dict):
        state_dict = from_transformers(state_dict)
        check_is_clip(state_dict)
        arch = transformers_arch(_json(repo_id, "config.json"), state_dict)
    else:
        check_is_clip(state_dict)
        arch = open_clip_arch(_json(repo_id, "open_clip_config.json"), state_dict)
    return state_dict, sha256_file(path), arch
