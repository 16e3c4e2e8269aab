"""State dicts of other layouts -> OpenAI CLIP layout, and architecture hints from their configs.

transformers `CLIPModel` keys (text_model.*, vision_model.*, *_projection.weight) are renamed; its
separate q/k/v projections are stacked into in_proj_weight / in_proj_bias (rows q, k, v), and the
projections are transposed ((E, D) Linear weights -> (D, E) matrices). open_clip checkpoints are
already in OpenAI layout; only their config can tell activation and head width.
"""
import re

import torch

from .model import DEFAULT_HEAD_WIDTH

_FIXED = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_TOWERS = {"text_model": "transformer.resblocks", "vision_model": "visual.transformer.resblocks"}
_LAYER = re.compile(r"(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_IN_LAYER = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_IGNORED_SUFFIX = "position_ids"  # index buffers of older transformers versions


def is_transformers_layout(state_dict: dict) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in state_dict)


def _layer_key(rest: str) -> str | None:
    module, _, param = rest.rpartition(".")
    return f"{_IN_LAYER[module]}.{param}" if module in _IN_LAYER else None


def from_transformers(state_dict: dict) -> dict:
    """transformers CLIPModel state dict -> OpenAI layout."""
    out, qkv, unknown = {}, {}, []
    for key, value in state_dict.items():
        layer = _LAYER.fullmatch(key)
        if key.endswith(_IGNORED_SUFFIX):
            continue
        if key in _FIXED:
            out[_FIXED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()  # (E, D) -> (D, E)
        elif layer and _QKV.fullmatch(layer[3]):
            which, kind = _QKV.fullmatch(layer[3]).groups()
            qkv.setdefault((f"{_TOWERS[layer[1]]}.{layer[2]}", kind), {})[which] = value
        elif layer and _layer_key(layer[3]):
            out[f"{_TOWERS[layer[1]]}.{layer[2]}.{_layer_key(layer[3])}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a transformers CLIPModel state dict: unrecognised keys {unknown[:10]}")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{prefix}: q/k/v projection {kind} incomplete, found only {sorted(parts)}")
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# transformers omits defaults from saved configs; these are CLIPTextConfig / CLIPVisionConfig's
_HF_DEFAULTS = {
    "text_config": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "vision_config": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}
_LAYER_NORM_EPS = 1e-5  # what our LayerNorm uses (torch's default, as in OpenAI CLIP)
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # name -> quick_gelu flag


def _widths(state_dict: dict) -> tuple[int, int]:
    """(vision attention width, text width) of an OpenAI-layout state dict."""
    if "visual.attnpool.positional_embedding" in state_dict:
        vision = state_dict["visual.attnpool.positional_embedding"].shape[1]
    else:
        vision = state_dict["visual.conv1.weight"].shape[0]
    return vision, state_dict["ln_final.weight"].shape[0]


def transformers_arch(config: dict | None, state_dict: dict) -> dict:
    """build_model keyword arguments from a transformers config.json (converted state dict)."""
    if not config:
        return {}
    text = {**_HF_DEFAULTS["text_config"], **config.get("text_config", {})}
    vision = {**_HF_DEFAULTS["vision_config"], **config.get("vision_config", {})}
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) > 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"unsupported activations {sorted(acts)}: need one of {list(_ACTIVATIONS)} for both towers")
    if {text["layer_norm_eps"], vision["layer_norm_eps"]} != {_LAYER_NORM_EPS}:
        raise ValueError(f"unsupported layer_norm_eps (text {text['layer_norm_eps']}, "
                         f"vision {vision['layer_norm_eps']}); CLIP uses {_LAYER_NORM_EPS}")
    vision_width, text_width = _widths(state_dict)
    return {"quick_gelu": _ACTIVATIONS[acts.pop()],
            "vision_head_width": vision_width // vision["num_attention_heads"],
            "text_head_width": text_width // text["num_attention_heads"]}


# open_clip options that change the computation without changing the state-dict keys: anything
# but these defaults is a model our OpenAI-style CLIP would silently compute wrongly
_OPEN_CLIP_DEFAULTS = {
    "vision_cfg": {"pool_type": "tok", "final_ln_after_pool": False, "attentional_pool": False,
                   "no_ln_pre": False, "pos_embed_type": "learnable", "act_kwargs": None,
                   "norm_kwargs": None, "timm_model_name": None, "patch_dropout": 0.0},
    "text_cfg": {"pool_type": "argmax", "final_ln_after_pool": False, "no_causal_mask": False,
                 "embed_cls": False, "act_kwargs": None, "norm_kwargs": None,
                 "hf_model_name": None, "hf_tokenizer_name": None, "proj_bias": False},
}
_OPEN_CLIP_TEXT_HEADS = 8  # open_clip's CLIPTextCfg default


def _open_clip_problems(model_cfg: dict) -> list[str]:
    problems = []
    for section, defaults in _OPEN_CLIP_DEFAULTS.items():
        cfg = model_cfg.get(section, {})
        problems += [f"{section}.{k}={cfg[k]!r}" for k, v in defaults.items() if cfg.get(k, v) != v]
    return problems


def open_clip_arch(config: dict | None, state_dict: dict) -> dict:
    """build_model keyword arguments from an open_clip_config.json (absent: OpenAI defaults)."""
    model_cfg = (config or {}).get("model_cfg")
    if not model_cfg:
        return {}
    problems = _open_clip_problems(model_cfg)
    if problems:
        raise ValueError(f"open_clip options not supported by clip_custom's OpenAI-style CLIP: {problems}")
    _, text_width = _widths(state_dict)
    heads = model_cfg.get("text_cfg", {}).get("heads", _OPEN_CLIP_TEXT_HEADS)
    return {"quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            "vision_head_width": model_cfg.get("vision_cfg", {}).get("head_width", DEFAULT_HEAD_WIDTH),
            "text_head_width": text_width // heads}
