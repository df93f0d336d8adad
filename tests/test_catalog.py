"""The lake: atomic parts, SQL views (also on an empty lake), one-line SQL errors, the lock."""
import pyarrow as pa
import pytest

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import connect, fetchall, query
from soundlake.core.errors import UserError
from soundlake.pipelines.runner import pending_inputs, run_pipeline
from soundlake.pipelines.spec import load_spec


def _failure(source_id, error="corrupt", clip=None):
    return {"source": "local", "source_id": source_id, "clip_id": clip, "stage": "segment", "error": error,
            "permanent": True, "message": "m", "attempt": 1, "run_id": "r", "time": None}


def test_empty_lake_has_typed_views(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.create()
    con = connect(lake)
    for view in ("clips", "audio", "captions", "failures", "failures_open", "runs"):
        assert con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0] == 0
    assert "flac" not in [d[0] for d in con.execute("SELECT * FROM clips").description]


def test_parts_are_atomic_and_visible(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    rel = lake.write_part("failures", pa.Table.from_pylist([_failure("a")], schema=schema.FAILURES), "r1")
    assert rel.startswith("failures/part-r1-") and rel.endswith(".parquet")
    (tmp_path / "lake" / "failures" / "part-half.parquet.tmp").write_bytes(b"PAR1 half written")
    assert fetchall(lake, "SELECT count(*) AS n FROM failures") == [(1,)]
    assert lake.clean_tmp() == 1



def test_parts_compress_every_column_but_the_flac_one(tmp_path):
    """Nested columns too: keyed by their top-level name alone, list values got no codec."""
    import pyarrow.parquet as pq

    lake = Lake(str(tmp_path / "lake"))
    tag = pa.struct([("label", pa.string()), ("prob", pa.float32())])
    data = pa.table({"clip_id": ["a", "b"] * 50, "labels": [["siren", "bell"]] * 100,
                     "tags": pa.array([[{"label": "siren", "prob": 0.5}]] * 100, pa.list_(tag)),
                     "flac": [b"fLaC" * 64] * 100})
    meta = pq.ParquetFile(lake.path(lake.write_part("clips", data, "r1"))).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"clip_id": "ZSTD", "labels.list.element": "ZSTD", "tags.list.element.label": "ZSTD",
                      "tags.list.element.prob": "ZSTD", "flac": "UNCOMPRESSED"}
    flac = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "flac")
    assert "RLE_DICTIONARY" not in flac.encodings                   # PLAIN pages: exports copy them as they are

def test_failures_open_forgets_inputs_that_later_succeeded(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_part("failures", pa.Table.from_pylist([_failure("a"), _failure("b")], schema=schema.FAILURES), "r")
    clip = {f.name: None for f in schema.CLIPS}
    clip.update(source="local", source_id="a", clip_id="local:a:0")
    lake.write_part("clips", pa.Table.from_pylist([clip], schema=schema.CLIPS), "r")
    assert fetchall(lake, "SELECT source_id FROM failures_open") == [("b",)]


def test_resume_check_leaves_out_inputs_with_a_clip_failure_or_skip(tmp_path):
    """The anti-join keeps the listing's order, matches on (source, source_id), both columns,
    and reads parts whose schemas differ (written by earlier versions)."""
    lake = Lake(str(tmp_path / "lake"))
    listing = [{"source": src, "source_id": sid, "uri": f"{src}/{sid}"}
               for sid in ("e", "a", "d", "b", "c", "f") for src in ("local", "freesound")]
    assert pending_inputs(lake, listing) == listing          # no lake yet: everything is to do
    lake.create()
    assert pending_inputs(lake, listing) == listing          # a lake without parts
    clip = {f.name: None for f in schema.CLIPS}
    for sid in ("a", "b"):   # a clip part per input, two clips for "a"
        rows = [dict(clip, source="local", source_id=sid, clip_id=f"local:{sid}:{k}") for k in range(1 + (sid == "a"))]
        lake.write_part("clips", pa.Table.from_pylist(rows, schema=schema.CLIPS), "r")
    # A part as an older version wrote it (other columns, other order): matched by name.
    lake.write_part("failures", pa.table({"stage": ["segment"], "source_id": ["c"], "source": ["local"]}), "old")
    lake.write_part("failures", pa.Table.from_pylist([_failure("x")], schema=schema.FAILURES), "r")
    skip = {f.name: None for f in schema.SKIPPED}
    lake.write_part("skipped", pa.Table.from_pylist([dict(skip, source="freesound", source_id="d")],
                                                    schema=schema.SKIPPED), "r")
    done = {("local", "a"), ("local", "b"), ("local", "c"), ("freesound", "d")}
    expected = [r for r in listing if (r["source"], r["source_id"]) not in done]
    assert pending_inputs(lake, listing) == expected and len(expected) == 8


def test_bad_query_is_one_line(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.create()
    with pytest.raises(UserError) as e:
        query(lake, "SELEC * FROM clips")
    assert str(e.value).startswith("SQL error:") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no lake"):
        connect(str(tmp_path / "nowhere"))


def test_second_writer_refused_or_waits(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    spec = load_spec("local", sets=[f"source.input={tmp_path}"])
    with lake.lock("first-run"):
        assert lake.is_locked() and lake.holds_lock("first-run") and not lake.holds_lock("other")
        with pytest.raises(UserError, match="busy.*first-run.*--wait"):
            run_pipeline(spec, lake.uri)
    assert not lake.is_locked()


def test_failed_run_removes_only_its_own_half_written_parts(tmp_path):
    """A run that stops with tasks still writing waits for them, then removes what they left:
    a part renamed meanwhile stays, another run's half-written part is not this run's to judge."""
    import threading

    lake = Lake(str(tmp_path / "lake"))
    lake.create()
    (tmp_path / "lake" / "clips").mkdir()
    mine, finishing, other = (tmp_path / "lake" / "clips" / n for n in
                              ("part-r1-a.parquet.tmp", "part-r1-b.parquet.tmp", "part-r2-c.parquet.tmp"))
    for p in (mine, finishing, other):
        p.write_bytes(b"x")
    done = finishing.with_name("part-r1-b.parquet")
    threading.Timer(0.3, lambda: finishing.rename(done)).start()   # a writer that ends on its own
    assert lake.clean_tmp("r1", settle_s=1.0) == 1
    assert not mine.exists() and done.exists() and other.exists()


# ---- commits: a part counts once the driver commits it ------------------------------------------
def test_a_part_counts_once_committed(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with lake.lock("r1"):
        pass                                                        # every table has its log now
    rows = pa.Table.from_pylist([_failure("a"), _failure("b")], schema=schema.FAILURES)
    rel = lake.write_part("failures", rows, "r1", commit=False)     # as a worker writes it
    assert fetchall(lake, "SELECT count(*) FROM failures") == [(0,)] and lake.parts("failures") == []
    lake.commit({"failures": [rel]}, "r1")
    assert fetchall(lake, "SELECT count(*) FROM failures") == [(2,)]
    assert lake.parts("failures") == [lake.path(rel)]


def test_a_lake_written_before_commits_reads_as_before_and_is_taken_over(tmp_path):
    import pyarrow.parquet as pq

    lake = Lake(str(tmp_path / "lake"))
    (tmp_path / "lake" / "failures").mkdir(parents=True)
    old = pa.Table.from_pylist([_failure("old")], schema=schema.FAILURES)
    pq.write_table(old, tmp_path / "lake" / "failures" / "part-old-1.parquet")   # no log: an earlier soundlake
    assert fetchall(lake, "SELECT source_id FROM failures") == [("old",)]
    lake.write_part("failures", pa.Table.from_pylist([_failure("new")], schema=schema.FAILURES), "r2")
    assert fetchall(lake, "SELECT source_id FROM failures ORDER BY 1") == [("new",), ("old",)]
    assert (tmp_path / "lake" / "failures" / "_delta_log").is_dir()


def test_parts_of_a_task_that_never_reported_back_never_count(ray_session, tmp_path):
    """What a node lost right after writing leaves behind: a block's parts on disk whose summary
    never reached the driver, and the retried block's own. With every part counting, a lost
    attempt showed its clips twice (204 rows for 200 clip ids)."""
    import shutil

    lake = Lake(str(tmp_path / "lake"))
    spec = load_spec("demo", sets=["source.count=6", "source.duration=2", "segment.window=2", "ray.inputs_per_task=3"])
    assert run_pipeline(spec, lake.uri).clips == 6
    for table in ("clips", "captions"):                             # the lost attempt's copies
        for i, part in enumerate(lake.parts(table)):
            shutil.copy(part, lake.path(table, f"part-lost-{i}.parquet"))
    assert fetchall(lake, "SELECT count(*), count(DISTINCT clip_id) FROM clips") == [(6, 6)]
    assert fetchall(lake, "SELECT count(*) FROM captions") == fetchall(
        lake, "SELECT count(*) FROM (SELECT DISTINCT clip_id, captioner, text FROM captions)")
    runs_parts = len(lake.parts("runs"))
    again = run_pipeline(spec, lake.uri)
    assert again.inputs_skipped == 6 and again.clips == 0
    assert fetchall(lake, "SELECT count(*) FROM clips") == [(6,)]
    assert len(lake.parts("runs")) == runs_parts + 1   # a run with nothing to do adds its one record only


def test_a_run_records_the_versions_it_read_and_left_and_as_of_reads_them(ray_session, tmp_path):
    import json

    from soundlake.catalog import delta

    lake = Lake(str(tmp_path / "lake"))
    first = run_pipeline(load_spec("demo", sets=["source.count=2", "source.duration=2", "segment.window=2"]), lake.uri)
    after_first = delta.versions(lake)
    run_pipeline(load_spec("demo", sets=["source.count=4", "source.duration=2", "segment.window=2"]), lake.uri)
    (read, wrote), = fetchall(lake, f"SELECT read_as_of, wrote_as_of FROM runs WHERE run_id = '{first.run_id}'")
    assert json.loads(wrote)["clips"] == after_first["clips"] and json.loads(read)["clips"] < after_first["clips"]
    q = "SELECT count(*) AS n FROM clips"
    assert query(lake, q, as_of=first.run_id).to_pylist() == [{"n": 2}] and fetchall(lake, q) == [(4,)]
    assert fetchall(lake, "SELECT run_id, status FROM runs", as_of=first.run_id) == [(first.run_id, "finished")]
    noop = run_pipeline(load_spec("demo", sets=["source.count=4", "source.duration=2", "segment.window=2"]),
                        lake.uri, compact=True)                              # curate --compact
    assert any(n.startswith("compacted clips: 2 parts -> 1") for n in noop.notes), noop.notes
    assert len(lake.parts("clips")) == 1 and fetchall(lake, q) == [(4,)]
    assert query(lake, q, as_of=first.run_id).to_pylist() == [{"n": 2}]     # the old parts still serve it


def test_migrate_gives_an_earlier_lakes_tables_their_logs(tmp_path, soundlake_here):
    import pyarrow.parquet as pq

    lake = Lake(str(tmp_path / "lake"))
    (tmp_path / "lake" / "failures").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_failure("old")], schema=schema.FAILURES),
                   tmp_path / "lake" / "failures" / "part-old-1.parquet")
    r = soundlake_here("migrate", "--lake", lake.uri)
    assert r.exit_code == 0 and "failures: 1 parts now listed" in r.output, r.output
    assert (tmp_path / "lake" / "failures" / "_delta_log").is_dir()
    assert fetchall(lake, "SELECT source_id FROM failures") == [("old",)]
    r = soundlake_here("migrate", "--lake", lake.uri)
    assert r.exit_code == 0 and "nothing to migrate" in r.output, r.output


def _two_writers_at_once(uri: str) -> None:
    """Two writers commit 8 parts each into one lake at the same time; each part lands once."""
    import threading

    lake = Lake(uri)
    with lake.lock("setup"):
        pass
    errors = []

    def writer(name: str) -> None:
        try:
            for i in range(8):
                rows = pa.Table.from_pylist([_failure(f"{name}-{i}")], schema=schema.FAILURES)
                Lake(uri).write_part("failures", rows, name)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fetchall(lake, "SELECT count(*), count(DISTINCT source_id) FROM failures") == [(16, 16)]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_writers_on_object_storage_all_land_once(s3, kind, tmp_path, monkeypatch, request):
    """delta-rs commits with conditional puts, so a writer that loses a race retries on the new
    version and both writers' parts land, each once, with either catalog (commits take no lock:
    the catalog's lock only keeps out a second writing *command*)."""
    import boto3

    catalog = f"sqlite:///{tmp_path}/catalog.db" if kind == "sqlite" else request.getfixturevalue("postgres")
    monkeypatch.setenv("SOUNDLAKE_CATALOG", catalog)
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket="lakes")
    _two_writers_at_once(f"s3://lakes/shared-{kind}")   # moto keeps its buckets for the whole session


def test_concurrent_commits_on_a_local_lake_all_land_once(tmp_path):
    """What a review saved from the browser does while a curate commits: no lock, both land."""
    _two_writers_at_once(str(tmp_path / "lake"))


def test_sql_as_of_reads_every_table_as_it_was_after_a_run(tmp_path, soundlake_here):
    lake = Lake(str(tmp_path / "lake"))
    with lake.lock("r0"):
        pass
    for run, ids in (("r1", ["a", "b"]), ("r2", ["c"])):
        lake.write_part("failures", pa.Table.from_pylist([_failure(i) for i in ids], schema=schema.FAILURES), run)
        lake.write_part("skipped", pa.Table.from_pylist(
            [{"source": "local", "source_id": i, "stage": "segment", "reason": "too_short"} for i in ids],
            schema=schema.SKIPPED), run)
    r = soundlake_here("snapshots", "--lake", lake.uri)
    assert r.exit_code == 0 and r.output.index("r2") < r.output.index("r1"), r.output
    q = "SELECT (SELECT count(*) FROM failures), (SELECT count(*) FROM skipped)"
    assert query(lake, q, as_of="r1").to_pylist()[0] == {k: 2 for k in query(lake, q).column_names}
    assert list(query(lake, q).to_pylist()[0].values()) == [3, 3]
    assert list(query(lake, q, as_of="2000-01-01T00:00:00").to_pylist()[0].values()) == [0, 0]
    with pytest.raises(UserError, match="--as-of 'r9'.*soundlake snapshots"):
        query(lake, q, as_of="r9")
    r = soundlake_here("sql", q, "--lake", lake.uri, "--as-of", "r1", "--format", "csv")
    assert r.exit_code == 0 and r.output.splitlines()[1] == "2,2", r.output


def test_dedup_snapshots_travel_in_time_until_vacuum_forgets_them(tmp_path, soundlake_here):
    """The snapshot tables (duplicates, groups, eval sets, leakage) are replaced whole by each
    dedup or eval-sets run. --as-of used to read them as of now; each commit now keeps the
    pointer it left, with its time, and runs record the seq they saw."""
    import time
    from datetime import datetime, timezone

    from soundlake.catalog import snapshots

    lake = Lake(str(tmp_path / "lake"))

    def dedup_run(run: str, pairs: int) -> datetime:
        rows = [{"clip_a": f"a{i}", "clip_b": f"b{i}", "level": "fingerprint", "score": 1.0, "method": "m",
                 "model_hash": None, "run_id": run, "created": None} for i in range(pairs)]
        with lake.lock(run):
            rel = lake.write_part("duplicates", pa.Table.from_pylist(rows, schema=schema.DUPLICATES), run,
                                  commit=False)
            snapshots.commit(lake, {"duplicates": [rel]}, run)
            lake.write_part("failures", pa.Table.from_pylist([_failure(run)], schema=schema.FAILURES), run)
        time.sleep(0.01)
        return datetime.now(timezone.utc)

    after = [dedup_run("r1", 2), dedup_run("r2", 5), dedup_run("r3", 1)]
    q = "SELECT count(*) FROM duplicates"
    assert [query(lake, q, as_of=t.isoformat()).to_pylist()[0]["count_star()"] for t in after] == [2, 5, 1]
    assert fetchall(lake, q, as_of="r2") == [(5,)]            # by the run's last commit
    assert fetchall(lake, q, as_of="2000-01-01T00:00:00") == [(0,)]
    assert snapshots.versions(lake) == {snapshots.KEY: 3}
    r = soundlake_here("vacuum", "--lake", lake.uri, "--older-than", "0")
    assert r.exit_code == 0, r.output
    assert len(lake.glob_parts("duplicates")) == 2   # r3's, and r2's as its previous
    assert fetchall(lake, q) == [(1,)]
    with pytest.raises(UserError, match="removed by `soundlake vacuum`"):
        query(lake, q, as_of=after[0].isoformat())


def test_compact_then_vacuum(tmp_path, soundlake_here):
    """Compaction swaps many parts for one in a commit of its own (rows once, flac still
    uncompressed and PLAIN); the old parts serve --as-of until vacuum deletes them, with the
    parts a killed run's task wrote but never got committed."""
    import pyarrow.parquet as pq

    from soundlake.testing import make_synth_lake

    lake = make_synth_lake(tmp_path, 4)
    for i in range(3):
        lake.write_part("failures", pa.Table.from_pylist([_failure(f"f{i}")], schema=schema.FAILURES), f"r{i}")
    clips_before = fetchall(lake, "SELECT clip_id, audio_sha256 FROM clips ORDER BY 1")
    orphan = lake.write_part("failures", pa.Table.from_pylist([_failure("lost")], schema=schema.FAILURES), "rx",
                             commit=False)
    r = soundlake_here("compact", "--lake", lake.uri)
    assert r.exit_code == 0 and "failures" in r.output, r.output
    assert len(lake.parts("failures")) == 1
    assert fetchall(lake, "SELECT source_id FROM failures ORDER BY 1") == [("f0",), ("f1",), ("f2",)]
    assert fetchall(lake, "SELECT clip_id, audio_sha256 FROM clips ORDER BY 1") == clips_before
    meta = pq.read_metadata(lake.parts("clips")[0]).row_group(0)
    flac = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "flac")
    assert flac.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in flac.encodings
    assert query(lake, "SELECT count(*) AS n FROM failures", as_of="r2").to_pylist() == [{"n": 3}]
    r = soundlake_here("vacuum", "--lake", lake.uri, "--older-than", "0")
    assert r.exit_code == 0 and "deleted" in r.output, r.output
    assert not (tmp_path / "lake" / orphan).exists()
    assert len(lake.glob_parts("failures")) == 1 and len(lake.glob_parts("clips")) == 1
    assert fetchall(lake, "SELECT count(*) FROM failures") == [(3,)]


def _block_from(tmp_path, lake: Lake, seed: int) -> dict[str, list[str]]:
    """A block's clips and captions parts written into ``lake`` as workers leave them (not committed)."""
    import shutil

    from soundlake.testing import make_synth_lake

    src = make_synth_lake(tmp_path / f"src{seed}", 2, seed=seed, run=f"b{seed}")
    block = {}
    for table in ("clips", "captions"):
        (part,) = src.parts(table)
        rel = f"{table}/part-b{seed}-{table}.parquet"
        shutil.copy(part, lake.path(rel))
        block[table] = [rel]
    return block


def test_a_driver_killed_between_a_blocks_commits_shows_none_of_it_and_the_next_writer_finishes_it(
        tmp_path, monkeypatch):
    """Delta commits one table at a time: a driver killed after the captions commit and before
    the clips commit used to leave captions of clips no reader could see, and a re-run wrote
    them again."""
    from soundlake.catalog import delta
    from soundlake.testing import make_synth_lake

    lake = make_synth_lake(tmp_path, 2)
    with lake.lock("r0"):
        pass
    before = fetchall(lake, "SELECT (SELECT count(*) FROM clips), (SELECT count(*) FROM _captions_all)")
    block = _block_from(tmp_path, lake, seed=7)
    real = delta.commit

    def killed_before_clips(lake_, table, parts, run_id):
        if table == "clips":
            raise KeyboardInterrupt   # the driver dies between the two commits
        real(lake_, table, parts, run_id)

    monkeypatch.setattr(delta, "commit", killed_before_clips)
    with pytest.raises(KeyboardInterrupt):
        lake.commit(block, "r1")
    monkeypatch.undo()
    assert lake.path(block["captions"][0]) in delta.committed(lake, "captions")   # in the log...
    after_kill = "SELECT (SELECT count(*) FROM clips), (SELECT count(*) FROM _captions_all)"
    assert fetchall(lake, after_kill) == before                                   # ...but not shown
    assert lake.path(block["captions"][0]) not in lake.parts("captions")
    with lake.lock("r2"):                                                         # the next writer
        pass
    assert delta.pending(lake) == []
    n_new = fetchall(lake, "SELECT count(*) FROM clips")[0][0] - before[0][0]
    assert n_new > 0
    assert fetchall(lake, "SELECT count(*), count(DISTINCT clip_id) FROM clips") == [(before[0][0] + n_new,) * 2]
    assert fetchall(lake, "SELECT count(*) FROM captions WHERE clip_id NOT IN (SELECT clip_id FROM clips)") == [(0,)]
    assert len(delta.committed(lake, "captions")) == 2   # committed once, not again by the finish


def test_only_the_tables_a_query_reads_get_views():
    from soundlake.catalog.sql import tables_for

    assert tables_for("SELECT count(*) FROM clips") == {"clips"}
    assert {"captions", "scores", "reviews", "clips"} <= tables_for("SELECT * FROM dataset WHERE score > 0.3")
    assert tables_for("SELECT * FROM failures_open") == {"failures_open", "failures", "clips"}
    for anything in ("SHOW TABLES", "SELECT * FROM information_schema.tables", "WITH a AS (SELECT 1) SELECT * FROM a",
                     "SELECT * FROM clips, nosuchtable"):
        assert tables_for(anything) is None   # unsure: every view is built


def test_a_query_reading_one_table_sees_what_the_full_views_see(tmp_path):
    from soundlake.testing import make_synth_lake

    lake = make_synth_lake(tmp_path, 3, template=True)
    for q in ("SELECT count(*) FROM clips", "SELECT count(*), count(caption) FROM dataset",
              "SELECT count(*) FROM failures_open", "SELECT count(*) FROM audio"):
        con = connect(lake)
        assert fetchall(lake, q) == con.execute(q).fetchall(), q


def test_a_run_removes_its_own_parts_that_were_never_committed(tmp_path):
    from soundlake.catalog import delta

    lake = Lake(str(tmp_path / "lake"))
    rows = pa.Table.from_pylist([_failure("a")], schema=schema.FAILURES)
    kept = lake.write_part("failures", rows, "r1")
    lost = lake.write_part("failures", rows, "r1", commit=False)          # a retried task's first attempt
    other = lake.write_part("failures", rows, "r2", commit=False)         # another run's, maybe still running
    assert delta.remove_orphans(lake, "r1") == 1
    assert not (tmp_path / "lake" / lost).exists()
    assert (tmp_path / "lake" / kept).exists() and (tmp_path / "lake" / other).exists()
    assert fetchall(lake, "SELECT count(*) FROM failures") == [(1,)]
