"""Retry of recorded failures: rebuild the inputs whose open failures have chosen classes.

Every run writes its input rows to the ``inputs`` table, so :func:`retry_inputs` can
rebuild the inputs whose open failures have the chosen classes, and the runner
processes them again with ``attempt + 1`` under the original run's config
(:func:`spec_of_run`).
"""
from __future__ import annotations

import pyarrow as pa

from soundlake.catalog import schema
from soundlake.catalog.schema import INPUT_SCHEMA
from soundlake.catalog.sql import connect
from soundlake.core.errors import UserError
from soundlake.pipelines.spec import PipelineSpec


def inputs_table(rows: list[dict], run_id: str) -> pa.Table:
    """Input rows as stored in the ``inputs`` table (secrets never appear in rows)."""
    return pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows], schema=schema.INPUTS)


def retry_inputs(lake, classes: list[str], source: str | None = None) -> dict[str, list[dict]]:
    """Inputs whose open failures have one of ``classes``: run_id of the spec to use -> rows.

    Each row is the newest listed version of the input with ``attempt`` set to the
    failure's attempt + 1. Inputs that now have a clip are not returned.
    """
    con = connect(lake)
    cls = ", ".join("'" + c.replace("'", "''") + "'" for c in classes)
    where = f"f.error IN ({cls})" + (" AND f.source = ?" if source else "")
    sql = f"""
        WITH f AS (SELECT source, source_id, max(attempt) AS attempt FROM failures_open f
                   WHERE {where} AND f.clip_id IS NULL GROUP BY 1, 2),
             i AS (SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (
                   PARTITION BY source, source_id ORDER BY run_id DESC) AS rn FROM inputs) WHERE rn = 1)
        SELECT i.* EXCLUDE (attempt), f.attempt + 1 AS attempt
        FROM f JOIN i USING (source, source_id) ORDER BY i.source, i.source_id"""
    cur = con.execute(sql, [source] if source else [])
    names = [d[0] for d in cur.description]
    groups: dict[str, list[dict]] = {}
    for r in (dict(zip(names, values)) for values in cur.fetchall()):
        run_id = r.pop("run_id")
        groups.setdefault(run_id, []).append({k: r.get(k) for k in INPUT_SCHEMA.names})
    return groups


def spec_of_run(lake, run_id: str) -> PipelineSpec:
    row = connect(lake).execute("SELECT config_json FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if not row:
        raise UserError(f"run {run_id} has no recorded config")
    return PipelineSpec.model_validate_json(row[0])
