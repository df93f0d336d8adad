"""Screenshots of `soundlake serve`'s three pages for the README, taken with headless Chromium.

    .venv/bin/python scripts/serve_screenshots.py --lake ./lake [--clap ./models/clap] [--out docs]

Serves the lake (reviews on, as reviewer "demo") from this process on a free loopback port;
flags a caption and excludes a clip through the API so the pages show reviews (they are
written to the lake: point it at a copy when that matters), then saves serve-list.png (a
text similarity search when --clap is given), serve-clip.png and serve-dashboard.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from soundlake.serve.app import create_app, running


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--clap", default=None, help="CLAP model folder (the similarity box)")
    ap.add_argument("--text", default="a siren wails", help="the similarity search shown in the list")
    ap.add_argument("--out", default="docs")
    a = ap.parse_args()
    load_model = None
    if a.clap:
        from soundlake.models.clap.load import load_clap as load_model
    app = create_app(a.lake, review=True, reviewer="demo", load_model=load_model, clap_model=a.clap)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--hide-scrollbars"):
        opts.add_argument(arg)
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as api:
        listed = {"text": a.text, "sort": "similarity", "order": "desc"} if a.clap else {}
        rows = api.get("/api/clips", params={"page_size": "10", **listed}).json()["rows"]
        first, second = rows[0], rows[1]
        post = {"headers": {"content-type": "application/json"}}
        api.post("/api/reviews", json={"target": "caption", "clip_id": first["clip_id"], "captioner": first["captioner"],
                                       "caption_text": first["caption"], "verdict": "good"}, **post).raise_for_status()
        api.post("/api/reviews", json={"target": "clip", "clip_id": second["clip_id"], "verdict": "exclude",
                                       "reason": "speech over the scene"}, **post).raise_for_status()
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            query = "?" + urlencode(listed) if listed else ""
            spectrogram = "return document.getElementById('clip-spectrogram').naturalWidth > 0"
            pages = [("serve-list.png", f"/#/{query}", "return document.querySelectorAll('#clips tbody tr').length > 0"),
                     ("serve-clip.png", f"/#/clip/{quote(first['clip_id'])}", spectrogram),
                     ("serve-dashboard.png", "/#/dashboard", "return document.querySelectorAll('#dash-sources tbody tr').length > 0")]
            for name, path, ready in pages:
                driver.get(url + path)
                WebDriverWait(driver, 60).until(lambda d: d.execute_script(ready))
                time.sleep(0.5)       # layout settles
                driver.save_screenshot(str(out / name))
                print(f"wrote {out / name}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
