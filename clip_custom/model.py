"""The CLIP model (image tower + text transformer) and `build_model`, which reads every size off
the tensor shapes of an OpenAI-layout state dict."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm, Transformer, causal_mask
from .posembed import grid_side
from .resnet import TOTAL_STRIDE, ModifiedResNet
from .vit import VisionTransformer

DEFAULT_HEAD_WIDTH = 64  # every OpenAI CLIP uses 64-wide attention heads
INIT_LOGIT_SCALE = math.log(1 / 0.07)
# keys that OpenAI's archives store next to the weights; not parameters
NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight",
             "text_projection", "logit_scale")
VIT_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj")
RESNET_KEYS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding",
               "visual.attnpool.c_proj.weight")


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, visual: nn.Module, context_length: int, vocab_size: int,
                 width: int, heads: int, layers: int, quick_gelu: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.visual = visual
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @property
    def input_resolution(self) -> int:
        return self.visual.input_resolution

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised image (B, 3, H, W) -> embedding (B, E); other sizes than native work."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L), L <= context_length, end token = highest id -> embedding (N, E)."""
        n, length = text.shape
        if length > self.context_length:
            raise ValueError(f"text has {length} tokens; this model takes at most {self.context_length}")
        x = self.token_embedding(text) + self.positional_embedding[:length].to(self.dtype)  # (N, L, D)
        x = self.transformer(x, causal_mask(length, x.dtype, x.device))
        x = self.ln_final(x)
        x = x[torch.arange(n, device=x.device), text.argmax(dim=-1)]  # (N, D) at the end token
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, N)
        return logits_per_image, logits_per_image.t()


def _missing(state_dict: dict, keys) -> list[str]:
    return [k for k in keys if k not in state_dict]


def _block_count(state_dict: dict, prefix: str) -> int:
    """Number of distinct i in keys '<prefix><i>.*'."""
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _heads(width: int, head_width: int) -> int:
    if width % head_width:
        raise ValueError(f"attention width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def check_is_clip(state_dict: dict) -> None:
    missing = _missing(state_dict, TEXT_KEYS)
    vit, rn = _missing(state_dict, VIT_KEYS), _missing(state_dict, RESNET_KEYS)
    if not missing and (not vit or not rn):
        return
    if vit and rn:
        missing += vit if len(vit) < len(rn) else rn
    sample = ", ".join(list(state_dict)[:5]) or "(empty)"
    raise ValueError(
        f"not a CLIP state dict in OpenAI layout: missing {', '.join(missing)}. Expected the text "
        f"keys {', '.join(TEXT_KEYS)} and either {', '.join(VIT_KEYS)} (ViT) or "
        f"{', '.join(RESNET_KEYS)} (ModifiedResNet); found keys like {sample}")


def _build_vit(sd: dict, head_width: int, quick_gelu: bool) -> VisionTransformer:
    width, _, patch, _ = sd["visual.conv1.weight"].shape  # (D, 3, P, P)
    grid = grid_side(sd["visual.positional_embedding"])  # (1 + G*G, D)
    layers = _block_count(sd, "visual.transformer.resblocks.")
    return VisionTransformer(patch * grid, patch, width, layers, _heads(width, head_width),
                             sd["visual.proj"].shape[1], quick_gelu)


def _build_resnet(sd: dict, head_width: int) -> ModifiedResNet:
    layers = tuple(_block_count(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4))
    width = sd["visual.layer1.0.conv1.weight"].shape[0]  # (width, width, 1, 1)
    grid = grid_side(sd["visual.attnpool.positional_embedding"])  # (1 + G*G, 32*width)
    attn_width = sd["visual.attnpool.positional_embedding"].shape[1]
    return ModifiedResNet(layers, sd["visual.attnpool.c_proj.weight"].shape[0],
                          _heads(attn_width, head_width), grid * TOTAL_STRIDE, width)


def _load_weights(model: CLIP, state_dict: dict) -> None:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"state dict does not fit the CLIP read off its shapes: {err}") from err
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            "state dict does not fit the CLIP read off its shapes: "
            f"missing {missing[:10]} ({len(missing)} in all), "
            f"unexpected {result.unexpected_keys[:10]} ({len(result.unexpected_keys)} in all)")


def build_model(state_dict: dict, quick_gelu: bool = True, vision_head_width: int = DEFAULT_HEAD_WIDTH,
                text_head_width: int = DEFAULT_HEAD_WIDTH) -> CLIP:
    """CLIP in eval mode, float32, with every size read off the OpenAI-layout tensor shapes.

    The defaults (QuickGELU, 64-wide heads) hold for every OpenAI model; other CLIPs (e.g. LAION's
    on the hub) state them in their config, which `clip_custom.load` reads.
    """
    check_is_clip(state_dict)
    sd = {k: v for k, v in state_dict.items() if k not in NON_PARAMETER_KEYS}
    embed_dim = sd["text_projection"].shape[1]  # (D_text, E)
    if "visual.proj" in sd:
        visual = _build_vit(sd, vision_head_width, quick_gelu)
    else:
        visual = _build_resnet(sd, vision_head_width)
    width = sd["ln_final.weight"].shape[0]
    model = CLIP(embed_dim, visual, context_length=sd["positional_embedding"].shape[0],
                 vocab_size=sd["token_embedding.weight"].shape[0], width=width,
                 heads=_heads(width, text_head_width),
                 layers=_block_count(sd, "transformer.resblocks."), quick_gelu=quick_gelu)
    _load_weights(model, sd)
    return model.float().eval()
