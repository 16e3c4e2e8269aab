"""Our own CLIP: ViT and ModifiedResNet image towers, text transformer, tokenizer, loading.

The names below load on first use (PEP 562): ``import clip_custom.download`` (which the toolkit
does for every model) then does not import torchvision, whose import pulls in torch._dynamo and
costs ~1.9 s per run of a model that is not a CLIP.
"""
import importlib

_EXPORTS = {"available_models": "loading", "load": "loading", "load_state_dict_any": "loading",
            "CLIP": "model", "build_model": "model", "preprocess_tensor": "preprocess",
            "transform": "preprocess", "SimpleTokenizer": "tokenizer", "tokenize": "tokenizer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
