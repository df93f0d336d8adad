"""The SQL layer is read-only: one read statement, no file writes, no file reads outside the
lake unless asked; export --where is one boolean expression (issue: hardening, items 3-4)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import soundlake_cmd

from soundlake.catalog.sql import fetchall, query
from soundlake.core.errors import UserError
from soundlake.export.exporter import ExportArgs, run_export
from soundlake.testing import make_synth_lake


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlsafe")
    make_synth_lake(root, 6)
    return str(root / "lake")


def parts(lake: str) -> list[Path]:
    return sorted(Path(lake).rglob("*.parquet"))


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM clips",
    "WITH c AS (SELECT * FROM clips) SELECT count(*) FROM c",
    "DESCRIBE clips",
    "SHOW TABLES",
    "SUMMARIZE SELECT duration_s FROM clips",
    "EXPLAIN SELECT * FROM clips",
    "FROM clips SELECT clip_id LIMIT 1",
])
def test_read_statements_run(lake, sql):
    assert query(lake, sql).num_rows >= 1


@pytest.mark.parametrize("sql", [
    "COPY (SELECT * FROM _clip_parts) TO '{lake}/clips/part-x.parquet'",
    "EXPLAIN ANALYZE COPY (SELECT * FROM _clip_parts) TO '{lake}/clips/part-y.parquet'",
    "ATTACH '{lake}/extra.duckdb' AS extra",
    "SELECT 1; COPY (SELECT 1) TO '{lake}/x.csv'",
    "SELECT 1; SELECT 2",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "CREATE TABLE t AS SELECT 1",
    "EXPORT DATABASE '{lake}/dump'",
    "PRAGMA version",
])
def test_everything_else_is_refused_in_one_line(lake, sql):
    before = parts(lake)
    files_before = sorted(Path(lake).rglob("*"))
    with pytest.raises(UserError) as e:
        query(lake, sql.format(lake=lake))
    assert "\n" not in str(e.value)
    assert parts(lake) == before and sorted(Path(lake).rglob("*")) == files_before
    assert fetchall(lake, "SELECT count(*) FROM clips") == [(6,)]


def test_files_outside_the_lake_are_off_unless_asked(lake, tmp_path):
    outside = tmp_path / "notes.csv"
    outside.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="--allow-file-reads"):
        query(lake, f"SELECT * FROM read_csv('{outside}')")
    with pytest.raises(UserError):
        query(lake, "SELECT * FROM read_text('/etc/passwd')")
    assert query(lake, f"SELECT * FROM read_csv('{outside}')", allow_file_reads=True).num_rows == 1
    # the flag allows reading, never writing
    with pytest.raises(UserError):
        query(lake, f"COPY (SELECT 1) TO '{tmp_path}/w.csv'", allow_file_reads=True)
    assert not (tmp_path / "w.csv").exists()


def test_cli_refuses_with_one_line_and_exit_2(lake, tmp_path):
    out = subprocess.run(soundlake_cmd("sql", f"COPY (SELECT 1) TO '{tmp_path}/pwn.csv'", "--lake", lake),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")
    assert not (tmp_path / "pwn.csv").exists()


def test_export_where_is_one_boolean_expression(lake, tmp_path):
    pwn = tmp_path / "pwn.csv"
    evil = f"1=1); COPY (SELECT 1) TO '{pwn}'; SELECT * FROM clips WHERE (1=1"
    with pytest.raises(UserError, match="--where"):
        run_export(lake, ExportArgs(out=str(tmp_path / "a"), where=evil, shard_count=10, shard_size=None))
    assert not pwn.exists()
    with pytest.raises(UserError, match="--where"):
        run_export(lake, ExportArgs(out=str(tmp_path / "b"), where="1=1) UNION (SELECT 1", shard_count=10,
                                    shard_size=None))
    with pytest.raises(UserError, match="--where"):
        run_export(lake, ExportArgs(out=str(tmp_path / "c"), shard_count=10, shard_size=None,
                                    where=f"0 < (SELECT count(*) FROM read_csv('{pwn}'))"))
    ok = run_export(lake, ExportArgs(out=str(tmp_path / "d"), where="duration_s > 1 AND license = 'CC0'",
                                     shard_count=10, shard_size=None))
    assert ok.clips == 6
