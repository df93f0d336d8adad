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
