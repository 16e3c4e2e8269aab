"""Public loading API: one spec string names a CLIP everywhere.

Spec forms: an OpenAI name (see available_models(); downloaded once into $VITAL_CACHE/clip or
~/.cache/vital/clip, SHA-256 checked), `hf-hub:ORG/REPO` (transformers or open_clip layout), or a
local file (.safetensors, .pt/.pth/.bin state dict, OpenAI TorchScript archive).
"""
import difflib
import os

from .convert import from_transformers, is_transformers_layout
from .download import MODELS, fetch_openai, sha256_file
from .files import read_weight_file
from .hub import PREFIX as HUB_PREFIX
from .hub import load_hub
from .model import CLIP, build_model, check_is_clip
from .preprocess import transform


def available_models() -> list[str]:
    """Names of the OpenAI CLIP models."""
    return list(MODELS)


def _unknown_spec_message(spec: str) -> str:
    close = difflib.get_close_matches(spec, available_models(), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (f"unknown CLIP model {spec!r}.{hint} Valid: an OpenAI name ({', '.join(available_models())}), "
            f"'{HUB_PREFIX}ORG/REPO', or the path of an existing .safetensors, .pt/.pth state dict "
            "or OpenAI TorchScript archive.")


def _from_file(path, sha256: str) -> tuple[dict, str, dict]:
    state_dict = read_weight_file(path)
    if is_transformers_layout(state_dict):
        state_dict = from_transformers(state_dict)
    check_is_clip(state_dict)
    return state_dict, sha256, {}


def _resolve(spec) -> tuple[dict, str, dict]:
    """(OpenAI-layout float32 state dict, SHA-256 of the weight file, build_model kwargs)."""
    spec = os.fspath(spec)
    if spec in MODELS:
        return _from_file(*fetch_openai(spec))
    if spec.startswith(HUB_PREFIX):
        return load_hub(spec)
    if os.path.isfile(spec):
        return _from_file(spec, sha256_file(spec))
    raise ValueError(_unknown_spec_message(spec))


def load_state_dict_any(spec) -> tuple[dict, str]:
    """(OpenAI-layout float32 state dict, SHA-256 hex of the weight file) for any spec form.

    `build_model(state_dict)` assumes OpenAI's QuickGELU and 64-wide heads; `load` also applies what
    a hub repo's config says about those (e.g. LAION models use exact GELU).
    """
    state_dict, sha256, _ = _resolve(spec)
    return state_dict, sha256


def load(name_or_path, device="cpu", jit: bool = False) -> tuple[CLIP, object]:
    """(CLIP in eval mode, float32, on `device`; PIL -> normalised tensor transform).

    The model carries `weight_sha256`, the SHA-256 of the weight file it was built from.
    """
    if jit:
        raise ValueError("jit=True is not supported: clip_custom always builds the eager model "
                         "(its hook points need it); call load(..., jit=False)")
    state_dict, sha256, arch = _resolve(name_or_path)
    model = build_model(state_dict, **arch).to(device)
    model.weight_sha256 = sha256
    return model, transform(model.input_resolution)
