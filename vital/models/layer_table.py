"""A model's layer map for ``query_model_layers.py``: every hook point with its module type,
output shape at the input size, channels and layout, as a table or JSON."""
from __future__ import annotations

import dataclasses
import json
import re
import sys

from vital.config import opt, parse_cfg, resolve_device

MODEL_HELP = ("efficientnet-lite0 | efficientnet-lite1 | torchvision:NAME[?weights=none] | "
              "an OpenAI CLIP name (ViT-B/32, RN50, ...) | hf-hub:ORG/REPO | a weights file | "
              "module:package.module:factory")


@dataclasses.dataclass
class LayersCFG:
    """List the layers of a model with their output shapes and channel / neuron counts."""
    model: str = opt("efficientnet-lite0", MODEL_HELP)
    json: bool = opt(False, "print JSON instead of a table")
    filter: str = opt("", "keep layer names matching this regex (or plain substring)")
    size: int = opt(0, "input size in pixels (0: the model's native size)", low=0, high=4096)
    device: str = opt("cpu", "auto | cpu | cuda")


def name_matcher(pattern: str):
    """re.search with ``pattern``; a pattern that is not a valid regex is a plain substring."""
    if not pattern:
        return lambda name: True
    try:
        regex = re.compile(pattern)
    except re.error:
        return lambda name: pattern in name
    return lambda name: regex.search(name) is not None


def describe(target, pattern: str) -> dict:
    keep = name_matcher(pattern)
    return {
        "model": str(target.spec), "kind": target.kind, "input_size": target.input_size,
        "mean": list(target.mean), "std": list(target.std), "weight_hash": target.weight_hash,
        "default_layers": target.default_layers(), "blocks": target.blocks(),
        "layers": [info._asdict() for info in target.layers() if keep(info.name)],
    }


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def _blocks_line(blocks: list[str]) -> str:
    """What a bare layer number means for this model (``--layer 12`` = block 12)."""
    if not blocks:
        return "blocks: none (give layer names)"
    return (f"blocks (a bare layer number N means block N): 0..{len(blocks) - 1} = "
            f"{blocks[0]} .. {blocks[-1]}")


def format_table(desc: dict) -> str:
    rows = [(d["name"], d["type"], _shape_text(d["shape"]), str(d["channels"] or "-"),
             d["layout"] or "-") for d in desc["layers"]]
    header = ("name", "type", "output shape", "channels", "layout")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [f"model {desc['model']} ({desc['kind']}), input {desc['input_size']} px, "
           f"weights sha256 {desc['weight_hash'][:16]}...",
           f"default layers: {', '.join(desc['default_layers']) or '-'}",
           _blocks_line(desc["blocks"]), "",
           line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(f"{len(rows)} layer(s)")
    return "\n".join(out)


def main(argv=None) -> int:
    cfg = parse_cfg(LayersCFG, argv)
    try:
        from vital.models.loaders import load_target
        extra = {"input_size": cfg.size} if cfg.size > 0 else {}
        target = load_target(cfg.model, device=resolve_device(cfg.device), **extra)
        desc = describe(target, cfg.filter)
    except Exception as err:  # a one-line message, no traceback (the CLI contract)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if cfg.filter and not desc["layers"]:
        print(f"error: no layer of {cfg.model} matches --filter {cfg.filter!r} (a regex or a "
              f"plain substring of the names); run without --filter to list them all",
              file=sys.stderr)
        return 2
    if cfg.json:
        print(json.dumps(desc, indent=2))
        return 0
    print(format_table(desc))
    if target.kind == "clip-vit":
        from vital.models.target import VIT_LAYER_DOC
        print("\n" + "\n".join(f"{k:15} {v}" for k, v in VIT_LAYER_DOC.items()))
    return 0
