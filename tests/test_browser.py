"""`soundlake serve` in a real browser: headless Chromium from Debian through Selenium and the system
chromedriver (no browser download). Skipped when Chromium is missing, unless CI=true.

One server (uvicorn in a thread, token required, reviews on) and one browser for the module."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from soundlake.catalog.sql import fetchall
from soundlake.serve.app import create_app, running

sys.path.insert(0, str(Path(__file__).parent))
from serve_lake import make_serve_lake  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token"


def _need_browser():
    missing = [p for p in ("chromium", "chromedriver") if shutil.which(p) is None and not os.path.exists(f"/usr/bin/{p}")]
    if missing:
        why = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; scripts/setup.sh does)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + ": CI=true needs the browser tests to run")
        pytest.skip(why)
    try:
        import selenium  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("selenium is not installed: pip install -e '.[test]'")
        pytest.skip("selenium is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    _need_browser()
    return make_serve_lake(tmp_path_factory.mktemp("browser"), 8)


@pytest.fixture(scope="module")
def server(lake):
    with running(create_app(lake, token=TOKEN, review=True, reviewer="bob")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(20)
    driver.get(f"{server}/login?token={TOKEN}")
    yield driver
    driver.quit()


def wait(driver, cond, timeout=15):
    from selenium.common.exceptions import (
        NoAlertPresentException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders rows as results arrive: an element read mid-render is read again.
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,
                                                              NoAlertPresentException)).until(lambda d: cond(d))


def text(driver, css):
    return driver.find_element("css selector", css).text


def rows(driver):
    return [tr.get_attribute("data-clip-id") for tr in driver.find_elements("css selector", "#clips tbody tr")]


def test_token_is_enforced(browser, server):
    browser.delete_all_cookies()
    browser.get(server + "/")
    assert "token is needed" in browser.find_element("tag name", "body").text     # 401, no cookie yet
    browser.get(server + "/api/meta")
    assert "token is needed" in browser.find_element("tag name", "body").text
    browser.get(f"{server}/login?token={TOKEN}")
    wait(browser, lambda d: text(d, "#status") == "1–8 of 8 clips")
    assert browser.current_url.startswith(server + "/")
    assert "token" not in browser.current_url       # the login page leaves the token out of the address
    assert text(browser, "#mode") == "reviewing as bob"


def test_the_list_loads_and_a_filter_narrows_it(browser, server, lake):
    browser.get(server + "/#/")
    wait(browser, lambda d: len(rows(d)) == 8)
    expected = sorted(r[0] for r in fetchall(lake, "SELECT clip_id FROM clips WHERE list_contains(labels, 'hum')"))
    assert 0 < len(expected) < 8
    browser.find_element("id", "f-label").send_keys("hum")
    browser.find_element("id", "apply").click()
    wait(browser, lambda d: text(d, "#status") == f"1–{len(expected)} of {len(expected)} clips")
    assert sorted(rows(browser)) == expected
    # The SQL WHERE box, and its one-line error.
    browser.get(server + "/#/?where=" + "source_id%20%3D%20%270-3%27")
    wait(browser, lambda d: rows(d) == ["synth:0-3:0"])
    browser.get(server + "/#/?where=" + "nonsense%20%3D%3D%3D")
    wait(browser, lambda d: d.find_element("id", "error").is_displayed())
    assert "\n" not in text(browser, "#error") and text(browser, "#error")


def test_the_audio_element_loads_and_reports_a_duration(browser, server):
    browser.get(server + "/#/")
    wait(browser, lambda d: len(rows(d)) == 8)
    duration = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const a = document.querySelector('#clips tbody tr audio');
        a.addEventListener('loadedmetadata', () => done(a.duration));
        a.addEventListener('error', () => done('error ' + (a.error && a.error.code)));
        a.preload = 'auto'; a.load();""")
    assert duration == pytest.approx(2.0, abs=0.05)
    # Seeking needs range requests: the player asks for a part and plays from there.
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const a = document.querySelector('#clips tbody tr audio');
        a.addEventListener('timeupdate', () => { if (a.currentTime > 1.2) { a.pause(); done(a.currentTime); } });
        a.addEventListener('error', () => done('error'));
        a.currentTime = 1.0; a.play().catch((e) => done('play: ' + e));""")
    assert isinstance(played, float) and played > 1.2


def test_keyboard_flags_persist_to_the_lake(browser, server, lake):
    from selenium.webdriver.common.keys import Keys

    browser.get(server + "/#/")
    wait(browser, lambda d: len(rows(d)) == 8)
    body = browser.find_element("tag name", "body")
    body.send_keys("j")                                   # the second clip
    clip_id = rows(browser)[1]
    assert "selected" in browser.find_element("css selector", "#clips tbody tr[data-index='1']").get_attribute("class")
    shown = fetchall(lake, f"SELECT captioner, caption FROM dataset WHERE clip_id = '{clip_id}'")[0]
    body.send_keys("w")
    wait(browser, lambda d: "wrong" in d.find_element("css selector", "#clips tbody tr[data-index='1']").text)
    assert fetchall(lake, f"SELECT captioner, caption_text, verdict, reviewer FROM caption_reviews "
                          f"WHERE clip_id = '{clip_id}'") == [(*shown, "wrong", "bob")]
    body.send_keys("x")
    alert = wait(browser, lambda d: d.switch_to.alert)
    alert.send_keys("dog barks over it")
    alert.accept()
    wait(browser, lambda d: "excluded" in d.find_element("css selector", "#clips tbody tr[data-index='1']").text)
    assert fetchall(lake, "SELECT clip_id, reason, reviewer FROM excluded_clips") == [(clip_id, "dog barks over it", "bob")]
    body.send_keys("u")                                   # undo the exclusion: a newer review
    wait(browser, lambda d: "excluded" not in d.find_element("css selector", "#clips tbody tr[data-index='1']").text)
    assert fetchall(lake, "SELECT count(*) FROM excluded_clips") == [(0,)]
    # Enter opens the clip page: player, spectrogram and the flagged caption.
    body.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_element("id", "clip-title").text == clip_id)
    wait(browser, lambda d: d.execute_script("return document.getElementById('clip-spectrogram').naturalWidth") > 100)
    wait(browser, lambda d: len(d.find_elements("css selector", "#clip-captions tbody tr")) == 2)
    assert "wrong" in text(browser, "#clip-captions tbody")
    assert "bob" in text(browser, "#clip-reviews tbody")


def test_dashboard(browser, server):
    browser.get(server + "/#/dashboard")
    wait(browser, lambda d: "synth" in text(d, "#dash-sources tbody"))
    assert "corrupt" in text(browser, "#dash-failures tbody")
    assert len(browser.find_elements("css selector", "#dash-histograms .hist")) == 2
    assert "template" in text(browser, "#dash-thresholds tbody")
