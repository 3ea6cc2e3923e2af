"""The static explorer: its data files, resuming, and the page itself in a real headless browser
(Debian's chromium + chromium-driver, driven by selenium) opened from file:// with no server.

The browser test builds the explorer of a small real run in `runs/ci_explorer/` at the repository root
(git-ignored) and saves its screenshots there, in `explorer_screenshots/`, as CI artifacts; the bad-input
test does the same for a run whose SAE never fires, without notebook 04 or other/control completions,
and for data as an older release wrote them (`runs/ci_explorer_bad/`). Both read the browser's network
log: every request the page makes stays on file:// (no CDN, no server)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import helpers
from helpers.env import NotebookError
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
    window_text,
    write_site,
)
from helpers.model.hooks import hook_name
from helpers.run import REPLACED, SAE_METRICS, explorer_dir, sae_dir
from helpers.saes import TopKSAE
from helpers.saes.io import save_sae
from tests.explore.fake_run import D_SAE, LAYER, OTHER_ID, SAE_ID, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "ci_explorer"
BAD = ARTIFACTS.with_name("ci_explorer_bad")
CFG = ExplorerConfig(n_top=4, n_quantiles=3, per_quantile=2, reservoir=8, before=6, after=2)


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
    build_explorer(run, lm=tiny, config=replace(CFG, batch_tokens=7))  # speed only: not a setting
    assert "complete, reused" in capsys.readouterr().out


def test_other_settings_stop_and_overwrite_moves_the_old_explorer_aside(run, tiny, tmp_path, capsys):
    """Other explorer settings on a rerun (was: the SAE silently rebuilt) stop before anything is written;
    OVERWRITE rebuilds and keeps the old explorer in replaced/, which the site never lists."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("explorer_screenshots"))
    before = {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()}
    other = replace(CFG, n_top=3)
    with pytest.raises(NotebookError) as err:
        build_explorer(copy, lm=tiny, config=other, sae_filter="L1_mixed")
    msg = str(err.value)
    assert "stage 06_explore_features" in msg and "config.n_top: 4 → 3" in msg and "OVERWRITE = True" in msg
    assert {p: p.read_bytes() for p in sorted(copy.rglob("*")) if p.is_file()} == before, "nothing written"
    build_explorer(copy, lm=tiny, config=other, sae_filter="L1_mixed", overwrite=True)
    (kept,) = (copy / REPLACED).iterdir()
    assert str(kept) in capsys.readouterr().out
    assert (kept / "explorer" / "data" / SAE_ID / "table.js").read_bytes() == before[
        sae_data_dir(copy, SAE_ID) / "table.js"
    ]
    assert all(len(p["top"]) <= 3 for p in iter_pages(copy, SAE_ID))
    listed = _read_js(explorer_dir(copy) / "data" / "saes.js")["saes"]
    assert [s["sae_id"] for s in listed] == [SAE_ID], "only what this build wrote, nothing from replaced/"


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
        pytest.skip(
            f"no headless browser: chromium {'found' if binary else 'missing'}, chromedriver "
            f"{'found' if driver else 'missing'} (.ci/install installs Debian's chromium and chromium-driver)"
        )
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
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def _requests(browser) -> list[str]:
    """Every URL the page asked for since the last call (the browser's network log)."""
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _offline(urls: list[str]) -> None:
    away = [u for u in urls if not u.startswith(("file://", "data:", "about:"))]
    assert urls and not away, f"requests leaving the machine: {away}"


def test_explorer_in_a_headless_browser(run):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = run / "explorer_screenshots"
    shots.mkdir(exist_ok=True)
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 20)
        url = (explorer_dir(run) / "index.html").as_uri()
        assert url.startswith("file://")
        browser.get(f"{url}#sae={SAE_ID}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#table tbody tr[data-f]")) > 0)
        rows = browser.find_elements(By.CSS_SELECTOR, "#table tbody tr[data-f]")
        n_alive = sae_info(run, SAE_ID)["n_alive"]
        assert (
            len(rows) == min(200, n_alive)
            and f"{n_alive} of {D_SAE} features" in browser.find_element(By.ID, "count").text
        )
        heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#table th")]
        assert "corpus" in heads and len(rows[0].find_elements(By.TAG_NAME, "td")) == len(heads)
        table = read_table(run, SAE_ID)
        bars = browser.find_elements(By.CSS_SELECTOR, "#density-svg rect")
        heights = [float(b.get_attribute("height")) for b in bars]
        counted = sum(
            int(b.find_element(By.TAG_NAME, "title").get_attribute("textContent").split()[0]) for b in bars
        )
        assert counted == sum(r > 0 for r in table["firing_rate"]) and max(heights) > 50, (
            "every firing feature in a bar"
        )
        assert browser.find_elements(By.CSS_SELECTOR, "#density-corpus-svg rect"), "the corpus's density too"
        facts = browser.find_element(By.ID, "density-facts").text
        assert f"never fired {D_SAE - sum(r > 0 for r in table['firing_rate'])}" in facts
        browser.save_screenshot(str(shots / "table.png"))

        # search in the text of the top windows (text.js, loaded on demand): a word of feature 5's top window
        page5 = read_page(run, SAE_ID, 5)
        word = max("".join(page5["top"][0]["tokens"]).split(), key=len).strip(".,!?;:").lower()
        Select(browser.find_element(By.ID, "where")).select_by_value("text")
        browser.find_element(By.ID, "search").send_keys(word)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#table td.snippet mark"))
        hits = {
            r.get_attribute("data-f")
            for r in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr[data-f]")
        }
        want = {
            str(p["feature"])
            for p in iter_pages(run, SAE_ID)
            if word in window_text(p).lower() and (p["n_firing"] or p["corpus"]["n_firing"])
        }
        assert "5" in hits and hits == want, (word, hits ^ want)
        assert all(
            m.text.lower() == word for m in browser.find_elements(By.CSS_SELECTOR, "#table td.snippet mark")
        )
        browser.save_screenshot(str(shots / "text_search.png"))
        browser.find_element(By.ID, "search").clear()
        Select(browser.find_element(By.ID, "where")).select_by_value("labels")

        browser.find_element(By.ID, "search").send_keys("denial")
        wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "#table td.snippet"))
        wait.until(lambda b: b.find_element(By.ID, "count").text.startswith("1 of"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#table tbody tr[data-f]")
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
        # the new views: logit histogram, co-activation, quantile groups with counts, held-out d, scores
        lh = page["logit_histogram"]
        bars = browser.find_elements(By.CSS_SELECTOR, "#logit-histogram rect")
        assert (
            len(bars) == len(lh["counts"]) == CFG.logit_bins
            and sum(float(b.get_attribute("height")) > 0 for b in bars) > 3
        )
        assert (
            f"each of the {sum(lh['counts']):,} vocabulary entries"
            in browser.find_element(By.ID, "logit-card").text
        )
        links = browser.find_elements(By.CSS_SELECTOR, "#coactive a[data-f]")
        assert (
            [int(a.get_attribute("data-f")) for a in links]
            == [g for g, _, _ in page["coactive"]["neighbours"]]
            != []
        )
        heads = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#quantiles .group-head")]
        assert len(heads) == len(page["quantiles"]) and all("firings" in h for h in heads)
        assert "+1.5 [0.5, 2]" in browser.find_element(By.ID, "held-out-d").text
        assert "CI excludes 0" in browser.find_element(By.ID, "held-out-d").text
        assert "shuffled explanations: no baseline scored" in browser.find_element(By.ID, "detection").text
        hist = browser.find_elements(By.CSS_SELECTOR, "#histogram text")
        assert hist[0].text == f"{page['histogram']['min']:.3g}".rstrip("0").rstrip("."), (
            "starts at the smallest activation"
        )
        browser.save_screenshot(str(shots / "feature.png"))

        # per-token hover: the token's activation and the feature's top logit effect at it
        center = browser.find_element(By.CSS_SELECTOR, "#top-examples .example .t.center")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", center)
        ActionChains(browser).move_to_element(center).perform()
        wait.until(lambda b: b.find_element(By.ID, "tip").is_displayed())
        tip = browser.find_element(By.ID, "tip").text
        top_tok, top_w = page["logits"]["positive"][0]
        assert "activation" in tip and "top logit effect here" in tip and top_tok.strip() in tip, tip
        act = page["top"][0]["activation"]
        assert f"{act * top_w:.2g}"[:3] in tip.replace("+", ""), (tip, act * top_w)
        browser.save_screenshot(str(shots / "hover.png"))

        browser.get(f"{url}#sae={SAE_ID}&f=9999")
        wait.until(lambda b: b.find_elements(By.ID, "feature-error"))
        assert "out of range" in browser.find_element(By.ID, "feature-error").text
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, json.dumps(errors, indent=1)
        urls = _requests(browser)
        _offline(urls)
        assert any(u.endswith("/text.js") for u in urls) and any(u.endswith("/table.js") for u in urls)
    finally:
        browser.quit()
    names = ("table", "text_search", "search", "feature", "hover")
    assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in names)


@pytest.fixture(scope="module")
def bad_run(tiny):
    """A run whose SAE never fires (encoder bias far below zero), without notebook 04, a corpus or any
    other (ambiguous / unlabelled / control) completion."""
    shutil.rmtree(BAD, ignore_errors=True)
    BAD.mkdir(parents=True)
    make_run(BAD, tiny, with_analysis=False, with_corpus=False, with_other=False)
    sae = TopKSAE(32, D_SAE, l0=6, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    save_sae(
        sae,
        sae_dir(BAD, SAE_ID),
        hook_name=hook_name(LAYER),
        model_name="tiny-llama",
        metadata={"sae_id": SAE_ID},
    )
    build_explorer(BAD, lm=tiny, config=CFG, sae_filter="L1_mixed")
    return BAD


def _older_release(run: Path, into: Path) -> None:
    """The explorer data of `run` as the release before DATA_FORMAT 2 wrote them: no format, no logit
    histogram, co-activation, histogram minimum, group counts or text.js; and its SAE trained by release
    0.1.0 (its metrics.json says so), another by this release."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("explorer_screenshots"))
    (sae_dir(into, SAE_ID) / SAE_METRICS).write_text(json.dumps({"package_version": "0.1.0"}))
    (sae_dir(into, OTHER_ID) / SAE_METRICS).write_text(json.dumps({"package_version": helpers.__version__}))
    folder = sae_data_dir(into, SAE_ID)
    (folder / "text.js").unlink()
    done = json.loads((folder / "complete.json").read_text())
    del done["info"]["format"]
    (folder / "complete.json").write_text(json.dumps(done))
    for path in folder.glob("pages_*.js"):
        pages = _read_js(path)
        for p in pages.values():
            for key in ("logit_histogram", "coactive", "min_activation"):
                p.pop(key, None)
            p["histogram"].pop("min")
            for g in p["quantiles"]:
                g.pop("count")
        path.write_bytes(_js("pages", path.read_text().split('"')[3], pages))
    write_site(into)


def test_bad_input_views_say_what_is_missing(bad_run, run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = bad_run / "explorer_screenshots"
    shots.mkdir(exist_ok=True)
    info = sae_info(bad_run, SAE_ID)
    assert info["n_alive"] == 0 and any("no feature of this SAE fired" in n for n in info["notes"])
    assert any("no ambiguous, unlabelled or control completions" in n for n in info["notes"])
    old = tmp_path / "older"
    _older_release(run, old)
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 20)
        url = (explorer_dir(bad_run) / "index.html").as_uri()
        browser.get(f"{url}#sae={SAE_ID}")
        wait.until(lambda b: b.find_elements(By.ID, "density-empty"))
        assert "No feature of this SAE fired" in browser.find_element(By.ID, "density-empty").text
        assert "0 of 96 features" in browser.find_element(By.ID, "count").text
        assert "Every feature of this SAE is dead" in browser.find_element(By.ID, "no-rows").text
        browser.save_screenshot(str(shots / "nothing_fires.png"))

        browser.get(f"{url}#sae={SAE_ID}&f=3")
        wait.until(lambda b: b.find_elements(By.ID, "dead-note"))
        assert "never fired on the" in browser.find_element(By.ID, "dead-note").text
        assert "never fired" in browser.find_element(By.ID, "histogram").text
        assert browser.find_elements(By.CSS_SELECTOR, "#logit-histogram rect"), "the decoder's view stays"
        assert "Never fired" in browser.find_element(By.ID, "coactive-none").text
        assert "no such completions" in browser.find_element(By.ID, "no-other").text
        assert "notebook 04 has not run" in browser.find_element(By.ID, "held-out-d").text
        browser.save_screenshot(str(shots / "dead_feature.png"))
        _offline(_requests(browser))

        url = (explorer_dir(old) / "index.html").as_uri()
        browser.get(f"{url}#sae={SAE_ID}")
        wait.until(lambda b: b.find_elements(By.ID, "older-note"))
        # the SAE an older release trained is flagged as on the leaderboard: the list, the facts, a note
        flags = {s["sae_id"]: s["release"] for s in _read_js(explorer_dir(old) / "data" / "saes.js")["saes"]}
        assert flags[SAE_ID] == "older release 0.1.0" and flags[OTHER_ID] == "", flags
        options = {
            o.get_attribute("value"): o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sae option")
        }
        assert options[SAE_ID].endswith("(older release 0.1.0)") and options[OTHER_ID] == OTHER_ID
        assert browser.find_element(By.ID, "sae-facts").text.endswith("· older release 0.1.0")
        assert "trained by an older release 0.1.0" in browser.find_element(By.ID, "release-note").text
        Select(browser.find_element(By.ID, "where")).select_by_value("text")
        browser.find_element(By.ID, "search").send_keys("the")
        wait.until(lambda b: b.find_elements(By.ID, "text-missing"))
        assert "older release" in browser.find_element(By.ID, "text-missing").text
        browser.get(f"{url}#sae={SAE_ID}&f=5")
        wait.until(lambda b: b.find_elements(By.ID, "logit-histogram-missing"))
        for el in ("logit-histogram-missing", "coactive-missing"):
            assert "older release" in browser.find_element(By.ID, el).text
        assert "older release 0.1.0" in browser.find_element(By.ID, "release-note").text, "on its pages too"
        assert browser.find_elements(By.CSS_SELECTOR, "#histogram rect") and browser.find_elements(
            By.CSS_SELECTOR, "#quantiles .group-head"
        )
        browser.save_screenshot(str(shots / "older_release.png"))
        browser.get(f"{url}#sae={OTHER_ID}")
        wait.until(lambda b: b.find_elements(By.ID, "density-svg"))  # its table view
        assert not browser.find_element(By.ID, "sae-facts").text.endswith("0.1.0")
        assert not browser.find_elements(By.ID, "release-note"), "no flag on this release's SAE"
        errors = [
            e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "text.js" not in e["message"]
        ]
        assert not errors, json.dumps(errors, indent=1)
        _offline(_requests(browser))
    finally:
        browser.quit()


def test_explorer_data_from_before_settings_were_recorded(run, tiny, tmp_path, capsys):
    """A run folder whose explorer predates run.json's settings: its data's own record is compared, so
    the same settings reuse it and others stop, naming the difference."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("explorer_screenshots"))
    raw = json.loads((copy / "run.json").read_text())
    del raw["settings"]["06_explore_features"]
    (copy / "run.json").write_text(json.dumps(raw))
    capsys.readouterr()
    with pytest.raises(NotebookError, match="config.n_top: 4 → 3"):
        build_explorer(copy, lm=tiny, config=replace(CFG, n_top=3), sae_filter="L1_mixed")
    build_explorer(copy, lm=tiny, config=CFG, sae_filter="L1_mixed")
    assert "complete, reused" in capsys.readouterr().out
