"""The static explorer: its data files, resuming, and the page itself in a real headless browser
(Debian's chromium + chromium-driver, driven by selenium) opened from file:// with no server.

The browser test builds the explorer of a small real run in `runs/ci_explorer/` at the repository root
(git-ignored) and saves its screenshots there, in `explorer_screenshots/`, as CI artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.explore.dashboards import ExplorerConfig
from helpers.explore.pipeline import build_explorer
from helpers.explore.site import (
    CHUNK,
    _js,
    _read_js,
    iter_pages,
    read_page,
    read_table,
    sae_data_dir,
    sae_info,
)
from helpers.run import explorer_dir
from tests.conftest import tiny_chat_llama
from tests.explore.fake_run import D_SAE, SAE_ID, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "ci_explorer"
CFG = ExplorerConfig(n_top=4, n_quantiles=3, per_quantile=2, reservoir=8, before=6, after=2)


@pytest.fixture(scope="module")
def tiny(offline_lm):
    return tiny_chat_llama(offline_lm.tokenizer)


@pytest.fixture(scope="module")
def run(tiny):
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    make_run(ARTIFACTS, tiny)
    build_explorer(ARTIFACTS, lm=tiny, config=CFG)
    return ARTIFACTS


def test_data_files_round_trip_and_resume(run, tiny, capsys, tmp_path):
    (tmp_path / "a.js").write_bytes(_js("pages", "a/0", {"x": [1, "é\u2028</script>"]}))
    assert _read_js(tmp_path / "a.js") == {"x": [1, "é\u2028</script>"]}
    info = sae_info(run, SAE_ID)
    assert info["d_sae"] == D_SAE and (explorer_dir(run) / "index.html").exists()
    pages = list(iter_pages(run, SAE_ID))
    assert [p["feature"] for p in pages] == list(range(D_SAE))
    assert len(list(sae_data_dir(run, SAE_ID).glob("pages_*.js"))) == -(-D_SAE // CHUNK)
    assert read_page(run, SAE_ID, 70) == pages[70]
    assert read_table(run, SAE_ID)["feature"] == list(range(D_SAE))
    with pytest.raises(IndexError, match=r"feature 96 is out of range"):
        read_page(run, SAE_ID, D_SAE)
    before = (sae_data_dir(run, SAE_ID) / "table.js").stat().st_mtime_ns
    capsys.readouterr()
    build_explorer(run, lm=tiny, config=CFG)
    assert "complete, reused" in capsys.readouterr().out
    assert (sae_data_dir(run, SAE_ID) / "table.js").stat().st_mtime_ns == before
    build_explorer(run, lm=tiny, config=ExplorerConfig(n_top=3, before=6, after=2), sae_filter="L1_mixed")
    assert "complete, reused" not in capsys.readouterr().out, "other settings rebuild the SAE"
    assert all(len(p["top"]) <= 3 for p in iter_pages(run, SAE_ID))
    build_explorer(run, lm=tiny, config=CFG, sae_filter="L1_mixed")  # back to the browser test's settings


def _browser():
    """A headless chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip(f"no headless browser: chromium {'found' if binary else 'missing'}, chromedriver "
                    f"{'found' if driver else 'missing'} (.ci/install installs Debian's chromium and chromium-driver)")  # fmt: skip
    opts = Options()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1800",
    ):
        opts.add_argument(arg)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_explorer_in_a_headless_browser(run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = run / "explorer_screenshots"
    shots.mkdir(exist_ok=True)
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 20)
        url = (explorer_dir(run) / "index.html").as_uri()
        assert url.startswith("file://")
        browser.get(f"{url}#sae={SAE_ID}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#table tbody tr")) > 0)
        rows = browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")
        n_alive = sae_info(run, SAE_ID)["n_alive"]
        assert (
            len(rows) == min(200, n_alive)
            and f"{n_alive} of {D_SAE} features" in browser.find_element(By.ID, "count").text
        )
        heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#table th")]
        assert "corpus" in heads and len(rows[0].find_elements(By.TAG_NAME, "td")) == len(heads)
        browser.save_screenshot(str(shots / "table.png"))

        browser.find_element(By.ID, "search").send_keys("denial")
        wait.until(lambda b: b.find_element(By.ID, "count").text.startswith("1 of"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")
        assert len(rows) == 1 and rows[0].get_attribute("data-f") == "5" and "denials" in rows[0].text
        browser.save_screenshot(str(shots / "search.png"))

        rows[0].click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#histogram rect"))
        bars = browser.find_elements(By.CSS_SELECTOR, "#histogram rect")
        assert sum(float(b.get_attribute("height")) > 0 for b in bars) >= 1
        examples = browser.find_elements(By.CSS_SELECTOR, "#top-examples .example")
        page = read_page(run, SAE_ID, 5)
        assert len(examples) == len(page["top"]) > 0
        assert "".join(page["top"][0]["tokens"]).strip()[:20] in examples[0].text.replace("⏎\n", "\n")
        assert "denials of having done something" in browser.find_element(By.ID, "explanation").text
        assert browser.find_elements(By.CSS_SELECTOR, "#logits .tok") and browser.find_elements(
            By.CSS_SELECTOR, "#similar a"
        )
        corpus = page["corpus"]
        assert f"{corpus['n_tokens']:,} corpus tokens" in browser.find_element(By.ID, "corpus-rate").text
        assert (
            f"{corpus['n_tokens']:,} corpus tokens scanned" in browser.find_element(By.ID, "sae-facts").text
        )
        if corpus["n_firing"]:
            assert browser.find_elements(By.CSS_SELECTOR, "#corpus-histogram rect")
        shown = browser.find_elements(By.CSS_SELECTOR, "#corpus-examples .example")
        assert len(shown) == len(corpus["top"]) and "Top activations in the reference corpus" in (
            browser.find_element(By.ID, "corpus-examples").text
        )
        for ex, el in zip(corpus["top"], shown, strict=True):
            assert ex["sequence_id"] in el.text and "".join(ex["tokens"]).strip() in el.text.replace(
                "⏎\n", "\n"
            )
        browser.save_screenshot(str(shots / "feature.png"))

        browser.get(f"{url}#sae={SAE_ID}&f=9999")
        wait.until(lambda b: b.find_elements(By.ID, "feature-error"))
        assert "out of range" in browser.find_element(By.ID, "feature-error").text
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, json.dumps(errors, indent=1)
    finally:
        browser.quit()
    assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in ("table", "search", "feature"))
