"""`soundlake serve` on a large lake: server time of the list's JSON, and the page rendered in Chromium.

Builds a lake of N clips of metadata (no audio: the list never reads it) with the lake's own
writer (``Lake.write_part``, parts of 100,000 rows): clips from 4 sources with labels,
licenses and durations, two captions per clip (reference and template) and a CLAP score for
each, one tag per clip. Starts the server (uvicorn, in this process) — which precomputes the
list once for the lake state — and times, over HTTP on loopback, each request ``--repeat``
times (the first one cold):

* ``first_page``: the list's first page (50 rows, by clip id, with the total count);
* ``paging``: pages deep in the list (page 100, then the middle of the list);
* ``filter``: source + label/tag + CLAP score range + duration, sorted by score;
* ``where``: a SQL WHERE (through the read-only layer and the time limit);

then, with headless Chromium (Debian's, through Selenium), the time from navigation start to
the list's first page drawn (``render``). The targets (issue #18): each JSON ≤ 0.5 s server
time at 1,000,000 clips, the page ≤ 1.5 s. Times are wall-clock on a shared machine.
Run: ``python benchmarks/browser_latency.py [--clips 1000000 --lake /tmp/big-lake]``
(``--lake``: build there, or reuse it when it holds that many clips; ``--quick``: 3,000 clips).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
from common import figure, parse_args

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.serve.app import create_app, running

FIGURES = ("build", "precompute", "first_page", "paging", "filter", "where", "render")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does
SOURCES = ("freesound", "audioset", "vggsound", "local")
LICENSES = ("CC0", "CC-BY-4.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", "unknown")
LABELS = ("dog", "rain", "siren", "speech", "music", "engine", "bird", "wind", "door", "bell", "hum", "clicks",
          "water", "crowd", "footsteps", "keyboard")
PART_ROWS = 100_000


def texts(rng, n: int, kind: str) -> pa.Array:
    """n captions drawn from a vocabulary of a few thousand distinct sentences."""
    vocab = [f"{kind}: a {a} {b} {c} near a {d}" for a in ("loud", "soft", "distant", "close", "muffled")
             for b in LABELS for c in ("sounds", "repeats", "fades", "starts", "stops") for d in LABELS]
    return pa.array(np.asarray(vocab, dtype=object)[rng.integers(0, len(vocab), n)], pa.string())


def build(lake: Lake, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    now = datetime.now(timezone.utc)
    for start in range(0, n, PART_ROWS):
        m = min(PART_ROWS, n - start)
        idx = np.arange(start, start + m)
        ids = pa.array([f"bench:{i:07d}:0" for i in idx], pa.string())
        n_labels = rng.integers(1, 4, m)
        label_ids = rng.integers(0, len(LABELS), (m, 3))
        labels = pa.array([[LABELS[j] for j in row[:k]] for row, k in zip(label_ids, n_labels)], pa.list_(pa.string()))
        cols = {f.name: pa.nulls(m, f.type) for f in schema.CLIPS}
        cols.update(clip_id=ids, source=pa.array(np.asarray(SOURCES, dtype=object)[idx % len(SOURCES)], pa.string()),
                    source_id=pa.array([f"{i:07d}" for i in idx], pa.string()), run_id=pa.array(["bench"] * m),
                    start_s=pa.array(np.zeros(m)), duration_s=pa.array(rng.uniform(1, 10, m).round(2)),
                    sample_rate=pa.array(np.full(m, 16000, np.int32)), channels=pa.array(np.ones(m, np.int16)),
                    labels=labels, license=pa.array(np.asarray(LICENSES, dtype=object)[rng.integers(0, 5, m)], pa.string()),
                    url=pa.array([f"https://example.org/sounds/{i}" for i in idx], pa.string()),
                    created=pa.array([now] * m, schema.TS))
        lake.write_part("clips", pa.table(cols, schema=schema.CLIPS), "bench")
        caps, scores = [], []
        for captioner in ("reference", "template"):
            text = texts(rng, m, captioner)
            caps.append(pa.table({"clip_id": ids, "captioner": pa.array([captioner] * m), "model_id": pa.array([captioner] * m),
                                  "model_hash": pa.nulls(m, pa.string()), "prompt_version": pa.nulls(m, pa.string()),
                                  "text": text, "run_id": pa.array(["bench"] * m), "created": pa.array([now] * m, schema.TS)},
                                 schema=schema.CAPTIONS))
            scores.append(pa.table({"clip_id": ids, "captioner": pa.array([captioner] * m),
                                    "caption_model_id": pa.array([captioner] * m), "caption_text": text,
                                    "clap_model_id": pa.array(["clap-bench"] * m), "clap_model_hash": pa.array(["0"] * m),
                                    "score": pa.array(rng.normal(0.4, 0.12, m).astype(np.float32)),
                                    "run_id": pa.array(["bench"] * m), "created": pa.array([now] * m, schema.TS)},
                                   schema=schema.SCORES))
        lake.write_part("captions", pa.concat_tables(caps), "bench")
        lake.write_part("scores", pa.concat_tables(scores), "bench")
        lake.write_part("tags", pa.table({
            "clip_id": ids, "model_id": pa.array(["clap-bench"] * m), "model_hash": pa.array(["0"] * m),
            "label_set": pa.array(["bench"] * m), "rank": pa.array(np.zeros(m, np.int16)),
            "label": pa.array(np.asarray(LABELS, dtype=object)[rng.integers(0, len(LABELS), m)], pa.string()),
            "prob": pa.array(rng.uniform(0.2, 0.9, m).astype(np.float32)), "run_id": pa.array(["bench"] * m),
            "created": pa.array([now] * m, schema.TS)}, schema=schema.TAGS), "bench")


def timed(client: httpx.Client, params: dict, repeat: int) -> tuple[float, float, int]:
    """(first request's seconds, the median of the repeats, total rows matched) of one list request
    (a repeat reads the filter's count from the state's cache, as paging does)."""
    times, total = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get("/api/clips", params=params)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        total = r.json()["total"]
    return times[0], statistics.median(times[1:] or times), total


def render_time(url: str, n: int, repeat: int) -> str:
    """Navigation start → first page of the list drawn, in headless Chromium (median of ``repeat``)."""
    if shutil.which("chromium") is None or not Path("/usr/bin/chromedriver").exists():
        return "skipped: no chromium/chromedriver (apt-get install chromium chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    times = []
    try:
        for _ in range(repeat):
            driver.get("about:blank")
            driver.get(url + "/#/")
            WebDriverWait(driver, 60, poll_frequency=0.05).until(
                lambda d: d.execute_script("return window.soundlakeRenderedAt"))
            assert len(driver.find_elements("css selector", "#clips tbody tr")) == min(50, n)
            times.append(driver.execute_script("return window.soundlakeRenderedAt") / 1000)
    finally:
        driver.quit()
    return f"{statistics.median(times):.3f} s median of {repeat} (first {times[0]:.3f} s; target ≤ 1.5 s at 1M clips)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lake", default=None, help="build the lake here (kept), or reuse it")
    a = parse_args(ap, dict(clips=3000, repeat=2))
    tmp = None if a.lake else tempfile.mkdtemp(prefix="browser-latency-")
    lake = Lake(a.lake or str(Path(tmp) / "lake"))
    try:
        t0 = time.perf_counter()
        if lake.exists() and lake.parts("clips"):
            figure("build", f"reused {lake.uri}")
        else:
            build(lake, a.clips)
            figure("build", f"{a.clips} clips of metadata in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        app = create_app(lake)
        state = app.catalog.current()
        n = state.facets["clips"]
        figure("precompute", f"{state.built_s:.2f} s for {n} clips (once per lake state; "
                             f"server start {time.perf_counter() - t0:.2f} s)")
        mid = max(0, n // 100 - 1)
        cases = {
            "first_page": [{}],
            "paging": [{"page": "100"}, {"page": str(mid)}],
            "filter": [{"source": "freesound", "label": "dog", "score_min": "0.5", "score_max": "0.9",
                        "dur_min": "2", "sort": "score", "order": "desc"}],
            "where": [{"where": "license LIKE 'CC-BY%' AND duration_s < 5 AND caption ILIKE '%siren%'",
                       "page_size": "100"}],
        }
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for name, params_list in cases.items():
                parts, worst = [], 0.0
                for params in params_list:
                    cold, warm, total = timed(client, params, a.repeat)
                    worst = max(worst, cold, warm)
                    parts.append(f"first {cold:.3f} s, again {warm:.3f} s ({total} rows match {params or 'no filter'})")
                figure(name, "; ".join(parts) + f"; slowest {worst:.3f} s = {worst / 0.5:.2f}× the 0.5 s target")
            figure("render", render_time(url, n, a.repeat))
        app.catalog.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
