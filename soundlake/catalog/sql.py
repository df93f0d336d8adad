"""SQL over the lake with DuckDB.

Every command opens its own in-memory DuckDB whose views read the Parquet parts
directly. No DuckDB database file exists, so there is no file lock to fight over:
queries run while a curation job writes, and see every part committed so far.
"""
from __future__ import annotations

import duckdb
import pyarrow.dataset as pads

from soundlake.catalog import schema
from soundlake.catalog.lake import Lake
from soundlake.errors import UserError

# Views built on the raw tables. Later modules add theirs with `add_view`.
_VIEWS: dict[str, str] = {
    # The newest record of each run (a run writes one at start and one at the end).
    "runs": """SELECT * EXCLUDE (rn) FROM (
                 SELECT *, row_number() OVER (PARTITION BY run_id
                   ORDER BY ended IS NULL, ended DESC) AS rn FROM _runs) WHERE rn = 1""",
    # Failures not yet made good by a later success, one row (the latest attempt) each.
    "failures_open": """SELECT * EXCLUDE (rn) FROM (
                 SELECT f.*, row_number() OVER (PARTITION BY f.source, f.source_id, f.stage, f.clip_id
                   ORDER BY f.time DESC) AS rn FROM failures f
                 WHERE (f.clip_id IS NULL AND NOT EXISTS (SELECT 1 FROM clips c
                          WHERE c.source = f.source AND c.source_id = f.source_id))
                    OR f.clip_id IS NOT NULL) WHERE rn = 1""",
    "audio": "SELECT clip_id, sample_rate, channels, flac FROM _clip_parts",
}
_VIEW_ORDER: list[str] = list(_VIEWS)


def add_view(name: str, sql: str) -> None:
    if name not in _VIEWS:
        _VIEW_ORDER.append(name)
    _VIEWS[name] = sql


def _source(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> str:
    """A FROM-able expression for a table's parts, typed even when it has none."""
    files = lake.parts(table)
    if files and lake.is_local:
        glob = lake.path(table, "*.parquet").replace("'", "''")
        return f"read_parquet('{glob}', union_by_name = true)"
    name = f"_arrow_{table}"
    if files:
        con.register(name, pads.dataset(files, filesystem=lake.fs, format="parquet"))
    else:
        con.register(name, schema.TABLES[table].empty_table())
    return name


def connect(lake: Lake | str) -> duckdb.DuckDBPyConnection:
    lake = Lake(lake) if isinstance(lake, str) else lake
    if not lake.exists():
        raise UserError(f"no lake at {lake.uri}: run `soundlake curate demo --lake {lake.uri}` first")
    con = duckdb.connect(":memory:")
    for table in schema.TABLES:
        src = _source(con, lake, table)
        if table == "clips":
            con.execute(f"CREATE VIEW _clip_parts AS SELECT * FROM {src}")
            cols = ", ".join(schema.CLIP_COLUMNS)
            con.execute(f"CREATE VIEW clips AS SELECT {cols} FROM _clip_parts")
        elif table == "runs":
            con.execute(f"CREATE VIEW _runs AS SELECT * FROM {src}")
        else:
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM {src}")
    for name in _VIEW_ORDER:
        con.execute(f"CREATE VIEW {name} AS {_VIEWS[name]}")
    return con


def query(lake: Lake | str, sql: str):
    """Run one statement; a bad query becomes a one-line UserError."""
    con = connect(lake)
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"SQL error: {first}") from None
