"""Reading weight files safely: safetensors, TorchScript archives, weights-only torch files."""
import pickle
import warnings
from pathlib import Path

import torch

WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints nest the weights under these
DDP_PREFIX = "module."


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error type on bad headers/truncation
        raise ValueError(f"cannot read safetensors file {path} (truncated or corrupt?): {err}") from err


def _read_torch(path: Path) -> dict:
    """OpenAI TorchScript archive first (what OpenAI ships), then a weights-only torch file."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is what OpenAI ships
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as jit_err:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"cannot read weights from {path}: it holds Python objects besides tensors "
                f"({_blocked(err)}), and such a file is never unpickled here because unpickling "
                "can run code. Valid files: .safetensors, .pt/.pth/.bin state dicts of tensors, "
                "OpenAI .pt archives.") from None
        except Exception as err:
            raise ValueError(
                f"cannot read weights from {path}: it is neither a TorchScript archive ({jit_err}) "
                f"nor a weights-only torch file ({type(err).__name__}: {err}). Is it truncated or "
                "corrupt? Valid files: .safetensors, .pt/.pth/.bin state dicts, OpenAI .pt archives."
            ) from err


def _blocked(err: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to load the file with
    weights_only=False (which would run whatever the pickle holds)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "documentation" not in line]
    return useful[0].rstrip(".") if useful else "a refused pickle"


def _unwrap(obj, path: Path) -> dict:
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def read_weight_file(path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file on CPU, floating point ones upcast to float32."""
    path = Path(path)
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    state_dict = _unwrap(raw, path)
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
