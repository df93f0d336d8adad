"""Catalog scale: the lake's SQL, `status` and resume check on many clip rows in many part files.

Writes N clip rows (metadata and a 16-byte stand-in for the FLAC) with the lake's own writer
(``Lake.write_part``), once in ``--few`` parts and once in ``--many`` parts, the way a run of
that many tasks leaves them, then measures on each lake, against raw DuckDB over the same files
in the same run:

* a group-by and a filter query through ``soundlake.catalog.sql.query`` (the views every
  command builds) vs the same SQL on ``read_parquet([...the files...])``: in-process time
  (median of ``--repeat``) and the ratio;
* the whole ``soundlake sql`` and ``soundlake status`` processes (wall seconds, start-up
  included), beside a bare ``python -c "import duckdb"`` process;
* the resume check for a listing of all N inputs: ``pending_inputs`` (an anti-join in DuckDB)
  vs loading every committed (source, source_id) into a Python set (what soundlake did before),
  each in its own process: seconds, and the peak resident memory above the process's
  memory with the listing built (sampled every 5 ms).

Run: ``python benchmarks/catalog_scale.py [--rows 1000000 --few 2000 --many 20000]``
(``--quick``: 20,000 rows in 20 and 200 parts). Then ``soundlake compact`` rewrites the second
lake's parts (``soundlake.catalog.delta.compact``) and the same figures are measured on it
(``.compacted``). The issue's targets, after compaction: query ≤ 1.5× raw DuckDB,
``soundlake sql`` ≤ 2 s, ``status`` ≤ 2 s, resume check ≤ 3 s and ≤ 300 MB for 1 M ids.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
from common import figure, parse_args
from tqdm import tqdm

from soundlake.catalog import schema
from soundlake.catalog.delta import compact
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import query

FIGURES = ("query_vs_raw.few", "sql_process.few", "status_process.few", "resume_check.few", "resume_vs_set.few",
           "query_vs_raw.many", "sql_process.many", "status_process.many", "resume_check.many", "resume_vs_set.many",
           "query_vs_raw.compacted", "sql_process.compacted", "status_process.compacted", "resume_check.compacted",
           "resume_vs_set.compacted")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does

QUERIES = {
    "group-by": "SELECT license, count(*) AS n, round(sum(duration_s), 1) AS s FROM {t} GROUP BY 1 ORDER BY 1",
    "filter": "SELECT count(*) AS n FROM {t} WHERE source_id LIKE '%17%' AND duration_s > 9.5",
}
LICENSES = ["CC0", "CC-BY 4.0", "CC-BY-NC 4.0", "CC-BY 3.0"]


def clip_rows(start: int, n: int) -> pa.Table:
    """n clip rows (ids start..start+n) with the columns queries use; the rest null."""
    ids = range(start, start + n)
    cols = {
        "clip_id": [f"bench:{i:08d}:0" for i in ids], "source": ["bench"] * n,
        "source_id": [f"{i:08d}" for i in ids], "run_id": ["bench"] * n,
        "start_s": [0.0] * n, "duration_s": [5.0 + (i % 11) / 2 for i in ids],
        "sample_rate": [16000] * n, "channels": [1] * n, "license": [LICENSES[i % 4] for i in ids],
        "flac_bytes": [16] * n, "flac": [b"fLaC" + bytes(12)] * n,
    }
    return pa.Table.from_pydict({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in schema.CLIPS},
                                schema=schema.CLIPS)


def build(root: Path, rows: int, parts: int) -> Lake:
    """Parts written as a run's tasks write them, committed as its driver does: a batch of
    summaries (here 100 parts) at a time."""
    lake = Lake(str(root))
    with lake.lock("bench"):
        per, written = -(-rows // parts), []
        for start in tqdm(range(0, rows, per), desc=f"writing {parts} parts", unit="part", leave=False):
            written.append(lake.write_part("clips", clip_rows(start, min(per, rows - start)), f"task{start:08d}",
                                           commit=False))
            if len(written) == COMMIT_BATCH:
                lake.commit({"clips": written}, "bench")
                written = []
        lake.commit({"clips": written}, "bench")
    return lake


COMMIT_BATCH = 100


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def query_ratio(lake: Lake, repeat: int) -> tuple[float, float, float]:
    """(soundlake s, raw DuckDB s, ratio) summed over the queries, in this process."""
    files = lake.parts("clips")
    listed = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    ours = raw = 0.0
    for sql in QUERIES.values():

        def run_ours(sql=sql):
            return query(lake, sql.format(t="clips"))

        def run_raw(sql=sql):
            con = duckdb.connect(":memory:")
            out = con.execute(sql.format(t=f"read_parquet({listed})")).fetchall()
            con.close()
            return out

        expect = run_raw()
        got = run_ours()
        assert [tuple(r.values()) for r in got.to_pylist()] == expect, "soundlake and raw DuckDB disagree"
        ours += timed(run_ours, repeat)
        raw += timed(run_raw, repeat)
    return ours, raw, ours / raw


def process_s(args: list[str], repeat: int) -> float:
    def run():
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return timed(run, repeat)


RESUME = textwrap.dedent("""
    import json, sys, threading, time
    from soundlake.catalog.lake import Lake
    from soundlake.pipelines.runner import pending_inputs

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    lake, n, how = Lake(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rows = [{"source": "bench", "source_id": f"{i:08d}", "uri": f"/in/{i:08d}.wav"} for i in range(n)]
    base, peak, running = rss_mb(), [0.0], True

    def sample():  # the resident set every 5 ms while the check runs (DuckDB's memory included)
        while running:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    if how == "sql":
        todo = pending_inputs(lake, rows)
    else:  # the earlier check: every committed key in a Python set
        t = lake.read("clips", columns=["source", "source_id"])
        done = set(zip(t["source"].to_pylist(), t["source_id"].to_pylist()))
        todo = [r for r in rows if (r["source"], r["source_id"]) not in done]
    s = time.perf_counter() - t0
    peak[0] = max(peak[0], rss_mb())
    running = False
    sampler.join()
    print(json.dumps({"s": s, "mb": peak[0] - base, "todo": len(todo)}))
""")



def resume(lake: Lake, rows: int, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RESUME, lake.uri, str(rows), how], check=True,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["todo"] == 0, f"resume check ({how}) left {r['todo']} committed inputs to do"
    return r


def measure(lake: Lake, tier: str, rows: int, repeat: int) -> None:
    parts = len(lake.parts("clips"))
    ours, raw, ratio = query_ratio(lake, repeat)
    figure(f"query_vs_raw.{tier}", f"{ratio:.2f}x raw DuckDB ({ours * 1000:.0f} ms vs {raw * 1000:.0f} ms for "
                                   f"{len(QUERIES)} queries; {rows:,} rows in {parts:,} parts)")
    cli = [sys.executable, "-m", "soundlake.cli"]
    bare = process_s([sys.executable, "-c", "import duckdb"], repeat)
    sql_s = process_s(cli + ["sql", QUERIES["group-by"].format(t="clips"), "--lake", lake.uri], repeat)
    figure(f"sql_process.{tier}", f"{sql_s:.2f} s whole `soundlake sql` process (python -c 'import duckdb': {bare:.2f} s)")
    st = process_s(cli + ["status", "--lake", lake.uri], repeat)
    figure(f"status_process.{tier}", f"{st:.2f} s whole `soundlake status` process")
    new, old = resume(lake, rows, "sql"), resume(lake, rows, "set")
    figure(f"resume_check.{tier}", f"{new['s']:.2f} s, +{new['mb']:.0f} MB peak for {rows:,} listed inputs "
                                   f"(anti-join in DuckDB)")
    figure(f"resume_vs_set.{tier}", f"{old['s'] / new['s']:.2f}x faster, {old['mb']:.0f} MB vs {new['mb']:.0f} MB "
                                    f"peak (Python set of committed keys: {old['s']:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="clip rows in each lake")
    ap.add_argument("--few", type=int, default=2000, help="part files of the first lake")
    ap.add_argument("--many", type=int, default=20000, help="part files of the second lake")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (the median is reported)")
    ap.add_argument("--work", default=None, help="folder for the lakes (default: a temporary one)")
    args = parse_args(ap, {"rows": 20_000, "few": 20, "many": 200, "repeat": 1})
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for tier, parts in (("few", args.few), ("many", args.many)):
            t0 = time.perf_counter()
            lake = build(Path(tmp) / tier, args.rows, parts)
            print(f"{tier}: wrote {args.rows:,} rows in {parts:,} parts in {time.perf_counter() - t0:.1f} s", flush=True)
            measure(lake, tier, args.rows, args.repeat)
        t0 = time.perf_counter()
        before, after = compact(lake, "clips", "compact")
        print(f"compacted: {before:,} parts into {after:,} in {time.perf_counter() - t0:.1f} s", flush=True)
        measure(lake, "compacted", args.rows, args.repeat)


if __name__ == "__main__":
    main()
