#!/usr/bin/env python
"""Regenerate the README's gallery (docs/gallery.jpg) on the embedded EfficientNet-Lite0, offline.

Four runs of the public API, each from its offline preset in presets/ (only the paths, size,
steps, device and run folder are overridden), composed into one labelled JPEG:

  class       quickstart_efficientnet.json                 espresso       final.png
  inner       inner_efficientnet_blocks10.json             blocks.10:34   final.png, references.png
  arithmetic  arithmetic_espresso_tabby_efficientnet.json  coffee-coffee+cat  arithmetic_strip.png
  concepts    concept_efficientnet_espresso.json           blocks.15      concepts_grid.png

  python scripts/make_gallery.py --out docs/gallery.jpg        # 224 px, the presets' budgets
  python scripts/make_gallery.py --size 64 --steps_multires 2 4 --out /tmp/g.jpg   # quick check

The reference folders (`references/`) are built from the bundled photos when missing.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import vital
from vital.cli import EXIT_BAD_INPUT, known_errors
from vital.config import load_json_cfg, opt, parse_cfg, with_recipe
from vital.refs.bundled import build_reference_folders
from vital.refs.words import default_font_path


@dataclass
class CFG:
    """Regenerate the gallery image of the README (four runs on efficientnet-lite0, offline)."""
    out: str = opt("docs/gallery.jpg", "the gallery JPEG to write")
    ref_root: str = opt("references", "bundled reference folders (built here when missing)")
    presets: str = opt("presets", "folder of the offline presets the four runs start from")
    work_dir: str = opt("out_gallery", "parent of the run folders (one sub-folder per mode)")
    size: int = opt(224, "image size in px of every run")
    steps_multires: list[int] = opt([], "steps per stage for every run (empty = each preset's own)")
    concepts: int = opt(3, "concepts shown, most important first (0 = all of the preset's)")
    width: int = opt(1200, "gallery width in px (every row is scaled to it)")
    quality: int = opt(88, "JPEG quality")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = opt(True, "show progress bars")


TITLE_PX = 26   # height of the title band above each panel
GAP_PX = 8      # space between panels and rows


def settings(cfg: CFG, cfg_cls, preset: str, mode: str, **paths):
    """The mode's CFG as its script would resolve the preset (defaults < recipe < preset), then
    the preset's paths under ``ref_root`` and the gallery's overrides."""
    values = load_json_cfg(cfg_cls, Path(cfg.presets) / preset)
    values.update(paths, size=cfg.size, device=cfg.device, progress=cfg.progress,
                  out_dir=str(Path(cfg.work_dir) / mode))
    if cfg.steps_multires:
        values.update(steps_multires=list(cfg.steps_multires), save_steps=0)
    return with_recipe(cfg_cls, values.pop("recipe", None), **values)


def class_panel(cfg: CFG, refs: Path) -> list:
    run_cfg = settings(cfg, vital.ClassCFG, "quickstart_efficientnet.json", "class",
                       ref_dir=str(refs / "espresso"))
    run_dir, _ = vital.run_class(run_cfg)
    return [(Image.open(run_dir / "final.png"), f"class: {run_cfg.target}")]


def inner_panels(cfg: CFG, refs: Path) -> list:
    run_cfg = settings(cfg, vital.InnerCFG, "inner_efficientnet_blocks10.json", "inner",
                       data_dir=str(refs))
    run_dir, _ = vital.run_inner(run_cfg)
    where = f"{run_cfg.layer} : {run_cfg.neuron}"
    return [(Image.open(run_dir / "final.png"), f"inner neuron {where}"),
            (Image.open(run_dir / "references.png"), "its top real photos")]


def arithmetic_panel(cfg: CFG, refs: Path) -> list:
    run_dir, _ = vital.run_arithmetic(settings(
        cfg, vital.ArithmeticCFG, "arithmetic_espresso_tabby_efficientnet.json", "arithmetic",
        base=str(refs / "espresso" / "view_00.png"), sub=[str(refs / "espresso" / "view_01.png")],
        add=[str(refs / "tabby" / "view_00.png")]))
    return [(Image.open(run_dir / "arithmetic_strip.png"),
             "arithmetic: coffee - coffee + cat")]


def concepts_panel(cfg: CFG, refs: Path) -> list:
    run_cfg = settings(cfg, vital.ConceptCFG, "concept_efficientnet_espresso.json", "concepts",
                       ref_dir=str(refs / "espresso"), show=cfg.concepts)
    run_dir, _ = vital.run_concepts(run_cfg)
    return [(Image.open(run_dir / "concepts_grid.png"),
             f"concepts at {run_cfg.layer_block} + top patches")]


def titled(image: Image.Image, title: str, height: int, font) -> Image.Image:
    """``image`` scaled to ``height`` px with ``title`` in a band above it."""
    image = image.convert("RGB")
    width = max(1, round(image.width * height / image.height))
    tile = Image.new("RGB", (width, height + TITLE_PX), "white")
    tile.paste(image.resize((width, height), Image.LANCZOS), (0, TITLE_PX))
    ImageDraw.Draw(tile).text((2, 4), title, fill="black", font=font)
    return tile


def row(panels: list, width: int, font) -> Image.Image:
    """The panels side by side, all at one height, the row ``width`` px wide."""
    gaps = GAP_PX * (len(panels) - 1)
    height = round((width - gaps) / sum(im.width / im.height for im, _ in panels))
    tiles = [titled(im, title, height, font) for im, title in panels]
    strip = Image.new("RGB", (width, height + TITLE_PX), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + GAP_PX
    return strip


def compose(rows: list, width: int) -> Image.Image:
    """Rows of (image, title) panels stacked into one gallery image."""
    font = ImageFont.truetype(str(default_font_path()), 15)
    strips = [row(panels, width, font) for panels in rows]
    sheet = Image.new("RGB", (width + 2 * GAP_PX,
                              sum(s.height for s in strips) + GAP_PX * (len(strips) + 1)), "white")
    y = GAP_PX
    for strip in strips:
        sheet.paste(strip, (GAP_PX, y))
        y += strip.height + GAP_PX
    return sheet


def main(argv=None) -> int:
    cfg = parse_cfg(CFG, argv)
    refs = Path(cfg.ref_root)
    try:
        build_reference_folders(refs)   # keeps folders that are already complete
        rows = [class_panel(cfg, refs) + inner_panels(cfg, refs),
                arithmetic_panel(cfg, refs) + concepts_panel(cfg, refs)]
    except known_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(rows, cfg.width).save(out, quality=cfg.quality, optimize=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
