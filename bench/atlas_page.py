#!/usr/bin/env python
"""Size of an atlas site and how fast its layer pages paint (issue 24's targets: <= 50 MB for
a 320-unit layer, first paint < 1 s from file:// in the headless browser).

Loads every layer page of the site from ``file://`` in headless Chromium (Debian's ``chromium``
and ``chromium-driver``, ``selenium``), ``--repeat`` times, and prints the median first
contentful paint and DOMContentLoaded times, the number of cards, and the site's size on disk.

  python atlas.py --model efficientnet-lite0 --layers blocks.15 --units all --no-pictures \\
      --probe_dir PROBE --concept_model efficientnet-lite1 --run_name lite0_b15
  python bench/atlas_page.py out_atlas/lite0_b15
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path


from vital.atlas.site import layer_folder


def site_size_mb(site: Path) -> float:
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 2**20


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")
                                            or "/usr/bin/chromedriver"), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    data = json.loads((args.site / "atlas.json").read_text())
    print(f"{args.site}: {site_size_mb(args.site):.1f} MB on disk")
    driver = browser()
    try:
        for layer in data["layers"]:
            page = args.site / layer_folder(layer) / "index.html"
            paints, ready = [], []
            for _ in range(args.repeat):
                driver.get("about:blank")
                driver.get(page.resolve().as_uri())
                timing = driver.execute_script(
                    "var p = performance.getEntriesByName('first-contentful-paint')[0];"
                    "var n = performance.getEntriesByType('navigation')[0];"
                    "return [p ? p.startTime : -1, n.domContentLoadedEventEnd,"
                    " document.querySelectorAll('#grid .card').length];")
                paints.append(timing[0])
                ready.append(timing[1])
            print(f"{layer}: {timing[2]} cards; first contentful paint median "
                  f"{statistics.median(paints):.0f} ms, DOMContentLoaded "
                  f"{statistics.median(ready):.0f} ms ({args.repeat} loads)")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
