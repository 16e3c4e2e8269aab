"""The atlas's pages in a real headless browser (Debian's chromium + chromedriver, selenium):
opened from file://, search, sort and filter change the grid, the unit pages link to each other,
and no request leaves the machine. Skips (saying why) where chromium or selenium is missing."""
import shutil
from pathlib import Path

import pytest

from test_atlas import atlas_cfg
from vital.atlas.build import run_atlas

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[dev])")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("chromium and chromedriver are not installed (apt install chromium "
                    "chromium-driver; .ci/run does it)")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder, _ = run_atlas(atlas_cfg(tmp_path_factory.mktemp("atlas"), units=["0-5"]))
    return folder


def _visible_units(browser) -> list[int]:
    return [int(card.get_attribute("data-unit"))
            for card in browser.find_elements(By.CSS_SELECTOR, "#grid .card")
            if card.is_displayed()]


def _requests(browser) -> list[str]:
    return browser.execute_script(
        "return [location.href].concat(performance.getEntriesByType('resource')"
        ".map(function (e) { return e.name; }))")


def test_layer_page_search_sort_filter(browser, site):
    browser.get((site / "index.html").as_uri())
    browser.find_element(By.LINK_TEXT, "stage2").click()
    assert _visible_units(browser) == [0, 1, 2, 3, 4, 5]
    cards = {int(c.get_attribute("data-unit")): c for c in
             browser.find_elements(By.CSS_SELECTOR, "#grid .card")}
    label = cards[3].get_attribute("data-label")
    same = sorted(u for u, c in cards.items() if label in
                  (c.get_attribute("data-label") + "|" + c.get_attribute("data-candidates")))
    box = browser.find_element(By.ID, "search")
    box.send_keys(label.upper())                        # case-insensitive, labels and candidates
    assert _visible_units(browser) == same and 3 in same
    assert browser.find_element(By.ID, "count").text == f"{len(same)} shown"
    box.clear()
    box.send_keys("zzzz-no-such-label")
    assert _visible_units(browser) == []
    box.clear()
    box.send_keys(" ")
    Select(browser.find_element(By.ID, "sort")).select_by_value("similarity")
    sims = [float(c.get_attribute("data-similarity")) for c in
            browser.find_elements(By.CSS_SELECTOR, "#grid .card")]
    assert sims == sorted(sims, reverse=True)
    loops = {int(c.get_attribute("data-unit")): c.get_attribute("data-loop") for c in
             browser.find_elements(By.CSS_SELECTOR, "#grid .card")}
    for state in ("agree", "disagree"):
        Select(browser.find_element(By.ID, "filter")).select_by_value(state)
        assert sorted(_visible_units(browser)) == sorted(u for u, s in loops.items()
                                                         if s == state)
    assert all(url.startswith("file://") for url in _requests(browser))


def test_unit_pages_link_and_show_their_unit(browser, site):
    browser.get((site / "stage2" / "0.html").as_uri())
    assert "unit 0" in browser.find_element(By.TAG_NAME, "h1").text
    assert not browser.find_elements(By.ID, "prev")
    browser.find_element(By.ID, "next").click()
    assert "unit 1" in browser.find_element(By.TAG_NAME, "h1").text
    picture = browser.find_element(By.CSS_SELECTOR, "img.full")
    assert browser.execute_script("return arguments[0].naturalWidth", picture) > 0
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidates tr")
    assert len(rows) == 1 + 5
    assert browser.find_elements(By.CSS_SELECTOR, "svg.hist rect")
    # every top image carries an outline of its peak cell, drawn inside the image
    inside = browser.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('.tops .probe'), function (p) {"
        " var i = p.querySelector('img').getBoundingClientRect(),"
        "     b = p.querySelector('.peak').getBoundingClientRect();"
        " return b.width > 0 && b.left >= i.left - 0.5 && b.right <= i.right + 0.5"
        "     && b.top >= i.top - 0.5 && b.bottom <= i.bottom + 0.5; })")
    assert inside and all(inside)
    browser.find_element(By.ID, "prev").click()
    assert "unit 0" in browser.find_element(By.TAG_NAME, "h1").text
    browser.find_element(By.ID, "back").click()
    assert browser.current_url.split("#")[0].endswith("stage2/index.html")
    broken = browser.execute_script(
        "return Array.prototype.filter.call(document.images, function (i) {"
        " i.loading = 'eager'; return i.complete && i.naturalWidth === 0; }).length")
    assert broken == 0
    assert all(url.startswith("file://") for url in _requests(browser))
