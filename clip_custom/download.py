"""OpenAI CLIP weights: official URLs, downloaded once into the cache, SHA-256 verified.

The SHA-256 of each file is the second-to-last component of its URL. A download goes to a temporary
file in the cache folder and is moved into place (os.replace) only once its checksum is right.
"""
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from tqdm import tqdm

_ROOT = "https://openaipublic.azureedge.net/clip/models"
MODELS = {
    "RN50": f"{_ROOT}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_ROOT}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_ROOT}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{_ROOT}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{_ROOT}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{_ROOT}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_ROOT}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_ROOT}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_ROOT}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
CHUNK = 1 << 20  # bytes read per step, download and hashing
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class DownloadError(ConnectionError, RuntimeError):
    """Weights that are neither cached nor downloadable (offline, network or checksum failure);
    the message names the URL and where to place the file. A RuntimeError (the documented
    contract) and an OSError (what a script reports as one sentence, without a traceback)."""


def cache_dir() -> Path:
    """$VITAL_CACHE/clip, or ~/.cache/vital/clip."""
    root = os.environ.get("VITAL_CACHE") or Path.home() / ".cache" / "vital"
    return Path(root) / "clip"


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_openai(name: str) -> tuple[Path, str]:
    """Path of the verified weight file of OpenAI model `name` (downloaded if needed), and its SHA-256."""
    url = MODELS[name]
    expected = url.split("/")[-2]
    target = cache_dir() / os.path.basename(url)
    if target.is_file():
        if sha256_file(target) == expected:
            return target, expected
        warnings.warn(f"{target} does not have the SHA-256 {expected}; downloading it again",
                      stacklevel=2)
    _download(name, url, target, expected)
    return target, expected


def _offline_message(name: str, url: str, target: Path, expected: str, err: Exception) -> str:
    return (f"could not download CLIP {name} from {url} ({err}). Without network: fetch that URL on "
            f"another machine and put the file at {target} (the cache folder is $VITAL_CACHE/clip or "
            f"~/.cache/vital/clip); its SHA-256 must be {expected}.")


def _download(name: str, url: str, target: Path, expected: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                got = _stream(url, out, target.name)
            except _NETWORK_ERRORS as err:
                raise DownloadError(_offline_message(name, url, target, expected, err)) from err
        if got != expected:
            raise DownloadError(
                f"downloaded {url} but its SHA-256 is {got}, not {expected}; the partial file was "
                f"deleted. Try again, or put a good copy at {target}.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stream(url: str, out, label: str) -> str:
    """Copy url into the open file `out` with a progress bar; return the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as source:
        total = int(source.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            while chunk := source.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()
