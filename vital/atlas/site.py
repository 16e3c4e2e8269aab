"""The atlas's static pages, from ``atlas.json``'s data: ``index.html`` (the layers), one page per
layer (``<layer>/index.html``: a grid of unit cards with search, sort and filters) and one per
unit (``<layer>/<unit>.html``: picture, top probe images, candidate labels, closed-loop verdict,
activation histogram, previous / next links).

Everything the pages need ships in the package (``vital/atlas/static``: one CSS and one script,
copied next to the pages); nothing is fetched from the network, so the site works from
``file://`` and from ``python -m http.server``. The cards are plain HTML (the page reads without
the script); the script only filters and reorders them. Pages are written only when their text
changed, so a rerun touches only what is new.
"""
from __future__ import annotations

import html
from importlib import resources
from pathlib import Path

from vital.cache import atomic_write

__all__ = ["write_site", "layer_folder"]

_STATIC = ("atlas.css", "atlas.js")
_STRIP = 4   # top probe images on a card


def layer_folder(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in layer)


def _write(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it; True when written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return True


def _page(title: str, body: str, up: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title>"
            f"<link rel=\"stylesheet\" href=\"{up}static/atlas.css\"></head>\n<body>\n{body}\n"
            f"<script src=\"{up}static/atlas.js\"></script>\n</body></html>\n")


def _peak(top: dict) -> str:
    """An outline over a top probe image: the cell of the layer's grid where the unit is most
    active (``peak`` = [left, top, width, height] as fractions)."""
    if not top.get("peak"):
        return ""
    left, up, width, height = (100 * v for v in top["peak"])
    return (f"<span class=\"peak\" title=\"where the unit is most active\" style=\"left:"
            f"{left:.2f}%;top:{up:.2f}%;width:{width:.2f}%;height:{height:.2f}%\"></span>")


def _effect_section(effects: dict | None) -> str:
    """What a CLIP MLP neuron writes into the image embedding (neuron_effects.py)."""
    if not effects:
        return ""
    rows = "".join(f"<tr><td>{_e(w['text'])}</td><td>{w['coefficient']:+.3f}</td></tr>"
                   for w in effects["words"])
    table = (f"<table id=\"words\"><tr><th>text</th><th>coefficient</th></tr>{rows}</table>"
             if rows else "<p>no text set (--effects_texts)</p>")
    return (f"<h2>second-order effect on the embedding</h2><p>first PC of the top images' "
            f"effects explains {100 * effects['explained']:.1f} % of their variance; its "
            f"sparse decomposition over texts:</p>{table}")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _loop_state(unit: dict) -> str:
    """"agree" / "disagree" (the concept model's top-5 for the picture vs the label), "none"."""
    picture = unit.get("picture") or {}
    if "agrees_top5" not in picture:
        return "none"
    return "agree" if picture["agrees_top5"] else "disagree"


def _card(unit: dict, layer_dir: str) -> str:
    picture = unit.get("picture")
    thumb = (f"<img class=\"pic\" loading=\"lazy\" alt=\"picture of unit {unit['unit']}\" "
             f"src=\"../{_e(picture['thumb'])}\">" if picture else
             "<div class=\"pic nopic\">no picture</div>")
    strip = "".join(f"<img loading=\"lazy\" alt=\"\" src=\"../{_e(t['thumb'])}\" "
                    f"title=\"{t['activation']:.3g}\">" for t in unit["top_images"][:_STRIP])
    cands = "|".join([c["label"] for c in unit["candidates"]]
                     + [w["text"] for w in (unit.get("effects") or {}).get("words", [])])
    loop = _loop_state(unit)
    verdict = {"agree": "picture agrees", "disagree": "picture disagrees", "none": ""}[loop]
    return (f"<a class=\"card\" id=\"u{unit['unit']}\" href=\"{unit['unit']}.html\" "
            f"data-unit=\"{unit['unit']}\" data-label=\"{_e(unit['label'])}\" "
            f"data-candidates=\"{_e(cands)}\" data-similarity=\"{unit['similarity']:.6g}\" "
            f"data-selectivity=\"{unit['selectivity']:.6g}\" data-loop=\"{loop}\">"
            f"{thumb}<div class=\"name\">{unit['unit']}: {_e(unit['label'])}</div>"
            f"<div class=\"score\">sim {unit['similarity']:.3f} · sel "
            f"{unit['selectivity']:.2f} <span class=\"loop {loop}\">{verdict}</span></div>"
            f"<div class=\"strip\">{strip}</div></a>")


def _layer_page(data: dict, layer: str, info: dict) -> str:
    units = info["units"]
    folder = layer_folder(layer)
    cards = "\n".join(_card(u, folder) for u in units)
    pictured = sum(1 for u in units if u.get("picture"))
    agree = sum(1 for u in units if _loop_state(u) == "agree")
    judged = sum(1 for u in units if _loop_state(u) != "none")
    body = (f"<nav><a href=\"../index.html\">atlas</a> / {_e(layer)}</nav>"
            f"<h1>{_e(data['model'])} · {_e(layer)}</h1>"
            f"<p class=\"meta\">{len(units)} of {info['channels']} units · {pictured} pictures · "
            f"closed loop: the label in the concept model's top-5 for {agree} of {judged} "
            f"pictures · labels by {_e(data['similarity'])} against "
            f"{_e(data['concept_model'])}</p>"
            f"<div class=\"controls\"><input id=\"search\" type=\"search\" "
            f"placeholder=\"search labels, candidates and CLIP words\" aria-label=\"search\">"
            f"<label>sort <select id=\"sort\"><option value=\"unit\">unit</option>"
            f"<option value=\"similarity\">label score</option>"
            f"<option value=\"selectivity\">selectivity</option>"
            f"<option value=\"loop\">closed loop</option></select></label>"
            f"<label>show <select id=\"filter\"><option value=\"all\">all</option>"
            f"<option value=\"disagree\">picture and label disagree</option>"
            f"<option value=\"agree\">picture and label agree</option>"
            f"<option value=\"none\">no verdict</option></select></label>"
            f"<span id=\"count\">{len(units)} shown</span></div>"
            f"<div id=\"grid\" class=\"grid\">\n{cards}\n</div>")
    return _page(f"{layer} · {data['model']}", body, "../")


def _histogram_svg(hist: dict, mark: float | None) -> str:
    counts, low, high = hist["counts"], hist["low"], hist["high"]
    w, h, n = 360, 120, len(counts)
    top = max(counts) or 1
    bars = "".join(
        f"<rect x=\"{i * w / n:.1f}\" y=\"{h - c / top * (h - 10):.1f}\" "
        f"width=\"{w / n - 1:.1f}\" height=\"{c / top * (h - 10):.1f}\"></rect>"
        for i, c in enumerate(counts))
    line = ""
    if mark is not None:
        x = (min(max(mark, low), high) - low) / (high - low) * w
        beyond = " (beyond the probe set)" if mark > high else ""
        anchor, tx = ("end", x - 4) if x > w / 2 else ("start", x + 4)
        line = (f"<line class=\"mark\" x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"0\" y2=\"{h}\"></line>"
                f"<text x=\"{tx:.1f}\" y=\"12\" text-anchor=\"{anchor}\">picture {mark:.3g}"
                f"{beyond}</text>")
    return (f"<svg class=\"hist\" viewBox=\"0 0 {w} {h + 16}\" role=\"img\" "
            f"aria-label=\"activation histogram\">{bars}{line}"
            f"<text x=\"0\" y=\"{h + 14}\">{low:.3g}</text>"
            f"<text x=\"{w}\" y=\"{h + 14}\" text-anchor=\"end\">{high:.3g}</text></svg>")


def _unit_page(data: dict, layer: str, units: list[dict], k: int) -> str:
    unit = units[k]
    picture = unit.get("picture")
    prev_link = (f"<a id=\"prev\" href=\"{units[k - 1]['unit']}.html\">&larr; unit "
                 f"{units[k - 1]['unit']}</a>" if k > 0 else "")
    next_link = (f"<a id=\"next\" href=\"{units[k + 1]['unit']}.html\">unit "
                 f"{units[k + 1]['unit']} &rarr;</a>" if k + 1 < len(units) else "")
    nav = (f"<nav><a href=\"../index.html\">atlas</a> / <a id=\"back\" href=\"index.html#u"
           f"{unit['unit']}\">{_e(layer)}</a> / {unit['unit']} <span class=\"pn\">{prev_link} "
           f"{next_link}</span></nav>")
    if picture:
        pic = (f"<figure><img class=\"full\" src=\"../{_e(picture['image'])}\" alt=\"picture\">"
               f"<figcaption>inner-mode picture (activation {picture['activation']:.3g})"
               + (f" · <a href=\"../{_e(picture['references'])}\">its references</a>"
                  if picture.get("references") else "") + "</figcaption></figure>")
        if "picture_labels" in picture:
            word = "agrees" if picture["agrees_top5"] else "disagrees"
            share = picture.get("references_top5")
            photos = ("" if share is None else
                      f"; its top probe photos: {_e(', '.join(picture['references_labels']))} "
                      f"({share:.0%} of them hold the label)")
            pic += (f"<p class=\"loop {_loop_state(unit)}\" id=\"verdict\">closed loop: the "
                    f"concept model names the picture {_e(', '.join(picture['picture_labels']))}"
                    f" — {word} with the label{photos}</p>")
    else:
        pic = "<p class=\"nopic\">no picture (built with --no-pictures, or not rendered yet)</p>"
    tops = "".join(f"<figure><span class=\"probe\"><img loading=\"lazy\" "
                   f"src=\"../{_e(t['thumb'])}\" alt=\"\">{_peak(t)}</span>"
                   f"<figcaption>{t['activation']:.3g}</figcaption></figure>"
                   for t in unit["top_images"])
    cands = "".join(f"<tr><td>{_e(c['label'])}</td><td>{c['similarity']:.3f}</td></tr>"
                    for c in unit["candidates"])
    effect = _effect_section(unit.get("effects"))
    body = (f"{nav}<h1>{_e(layer)} unit {unit['unit']}: {_e(unit['label'])}</h1>"
            f"<div class=\"unit\"><div>{pic}</div><div><h2>candidate labels</h2>"
            f"<table id=\"candidates\"><tr><th>label</th><th>similarity</th></tr>{cands}</table>"
            f"<h2>activation on the probe set</h2>"
            f"{_histogram_svg(unit['histogram'], picture['activation'] if picture else None)}"
            f"<p>selectivity {unit['selectivity']:.2f} (top-{len(unit['top_images'])} mean "
            f"minus mean, in standard deviations)</p>{effect}</div></div>"
            f"<h2>top probe images (mean activation; outlined: the position of the largest)</h2><div class=\"tops\">{tops}</div>")
    return _page(f"{layer} {unit['unit']} · {data['model']}", body, "../")


def _index_page(data: dict) -> str:
    rows = "".join(
        f"<li><a href=\"{layer_folder(layer)}/index.html\">{_e(layer)}</a> — "
        f"{len(info['units'])} of {info['channels']} units</li>"
        for layer, info in data["layers"].items())
    probe = data.get("probe") or {}
    body = (f"<h1>VITAL atlas · {_e(data['model'])}</h1>"
            f"<p class=\"meta\">labels: {_e(data['similarity'])} against "
            f"{_e(data['concept_model'])} on {_e(probe.get('used', '?'))} probe images "
            f"({_e(probe.get('folder', ''))})</p><ul id=\"layers\">{rows}</ul>"
            f"<p class=\"meta\">data: <a href=\"atlas.json\">atlas.json</a></p>")
    return _page(f"atlas · {data['model']}", body, "")


def write_site(site: Path, data: dict) -> int:
    """Write (or update) every page of ``data`` under ``site``; returns how many files were
    written (0 on a rerun that changed nothing)."""
    site = Path(site)
    written = 0
    for name in _STATIC:
        text = resources.files("vital.atlas").joinpath("static", name).read_text("utf-8")
        written += _write(site / "static" / name, text)
    written += _write(site / "index.html", _index_page(data))
    for layer, info in data["layers"].items():
        folder = site / layer_folder(layer)
        written += _write(folder / "index.html", _layer_page(data, layer, info))
        for k in range(len(info["units"])):
            written += _write(folder / f"{info['units'][k]['unit']}.html",
                              _unit_page(data, layer, info["units"], k))
    return written
