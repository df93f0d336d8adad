"""`soundlake status`: what is in a lake, which runs wrote it, what failed and why."""
from __future__ import annotations

from dataclasses import dataclass

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import connect, needed


@dataclass
class LakeStatus:
    lake: str
    writing: bool
    runs: list[dict]
    sources: list[dict]       # source, inputs, clips, hours
    tables: dict[str, int]    # table -> rows
    failures: list[dict]      # stage, error, permanent, inputs (open failures only)


def lake_status(lake: Lake | str, last_runs: int = 10) -> LakeStatus:
    lake = Lake(lake) if isinstance(lake, str) else lake
    con = connect(lake, only=needed({"runs", "clips", "failures_open", "captions", "failures", "skipped"}))
    writing = lake.is_locked()
    runs = con.execute(f"""SELECT run_id, pipeline,
                         CASE WHEN status = 'running' AND NOT {writing} THEN 'interrupted' ELSE status END AS status,
                         started, ended, counts_json FROM runs ORDER BY started DESC LIMIT {int(last_runs)}""").fetchall()
    cols = ["run_id", "pipeline", "status", "started", "ended", "counts_json"]
    sources = con.execute("""SELECT source, count(DISTINCT source_id) AS inputs, count(*) AS clips,
                           round(sum(duration_s) / 3600, 3) AS hours FROM clips GROUP BY 1 ORDER BY 1""").fetchall()
    failures = con.execute("""SELECT stage, error, permanent, count(*) AS n FROM failures_open
                          GROUP BY ALL ORDER BY n DESC""").fetchall()
    tables = {}
    for name in ("clips", "captions", "failures", "skipped", "runs"):
        tables[name] = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
    return LakeStatus(
        lake=lake.uri, writing=writing, runs=[dict(zip(cols, r)) for r in runs],
        sources=[dict(zip(["source", "inputs", "clips", "hours"], r)) for r in sources], tables=tables,
        failures=[dict(zip(["stage", "error", "permanent", "inputs"], r)) for r in failures])
