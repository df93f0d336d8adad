"""`soundlake sql`, `status`, `snapshots`, `compact`, `vacuum` and `report thresholds`: the lake."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from soundlake.cli.main import CATALOG, LAKE, LAKE_PANEL, app, console, report_app, stdout
from soundlake.core.errors import UserError


@app.command(rich_help_panel=LAKE_PANEL)
def sql(
    query: str = typer.Argument(..., help="One SQL statement over the lake's views (clips, audio, captions, "
                                "failures, failures_open, runs, ...)."),
    lake: str = LAKE,
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result here (needed for parquet)."),
    max_rows: int = typer.Option(40, help="table format: rows to show."),
    allow_file_reads: bool = typer.Option(False, "--allow-file-reads", help="Let the query read files outside "
                                          "the lake (read_csv('other.csv')); off by default. Writing is never allowed."),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="Read every table as it was at this instant: a run id "
                                        "(as it left the lake), an export id (as it read it) or an ISO time; "
                                        "`soundlake snapshots` lists them."),
):
    """Query the lake with DuckDB SQL: one read statement (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE,
    EXPLAIN). Read-only, and safe while a curation job is running.

    Prints the result as a table (the first --max-rows rows), CSV or JSON lines on stdout,
    or writes it to --out (CSV, JSON lines or Parquet). Audio bytes show as their size."""
    from soundlake.catalog.sql import query as run_query

    if format not in ("table", "csv", "json", "parquet"):
        raise UserError(f"--format {format!r}: expected table, csv, json or parquet")
    if format == "parquet" and output is None:
        raise UserError("--format parquet needs --out FILE")
    from soundlake.stages.caption import captioner_ranking

    result = run_query(lake, query, ranking=captioner_ranking(), load_model=load_clap,
                       allow_file_reads=allow_file_reads, as_of=as_of)
    if result is None:
        raise UserError("the statement returned no rows (only queries are supported)")
    import pyarrow as pa

    if format == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(result, output)
        console.print(f"wrote {result.num_rows} rows to {output}")
        return
    if format in ("csv", "json"):
        import pyarrow.csv as pacsv

        if format == "csv":
            sink = pa.BufferOutputStream()
            pacsv.write_csv(_printable(result), sink)
            text = sink.getvalue().to_pybytes().decode()
        else:
            text = "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in _printable(result).to_pylist())
            text += "\n" if text else ""
        if output:
            output.write_text(text)
            console.print(f"wrote {result.num_rows} rows to {output}")
        else:
            sys.stdout.write(text)
        return
    t = Table(show_lines=False)
    for name in result.column_names:
        t.add_column(name, overflow="fold")
    for row in _printable(result).slice(0, max_rows).to_pylist():
        t.add_row(*["" if v is None else str(v) for v in row.values()])
    stdout.print(t)
    if result.num_rows > max_rows:
        console.print(f"{result.num_rows} rows, {max_rows} shown (--max-rows, or --format csv)")
    else:
        console.print(f"{result.num_rows} row{'s' if result.num_rows != 1 else ''}")


def _printable(t):
    """Never print raw audio bytes: binary columns become their size, nested ones JSON text."""
    import pyarrow as pa

    cols = []
    for name, col in zip(t.column_names, t.columns):
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            col = pa.array([None if v is None else f"<{len(v)} bytes>" for v in col.to_pylist()], pa.string())
        elif pa.types.is_list(col.type) or pa.types.is_struct(col.type) or pa.types.is_fixed_size_list(col.type) \
                or pa.types.is_large_list(col.type):
            col = pa.array([None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.table(cols, names=t.column_names)


@app.command(rich_help_panel=LAKE_PANEL)
def status(lake: str = LAKE, runs: int = typer.Option(10, help="How many recent runs to list.")):
    """Summarise a lake on stdout: recent runs, clips per source, table sizes, open failures by class.

    Read-only; says whether a job is writing to the lake now."""
    from soundlake.catalog.status import lake_status

    st = lake_status(lake, runs)
    stdout.print(f"[bold]lake[/] {st.lake} · " + ("[yellow]a job is writing now[/]" if st.writing else "idle")
                 + " · " + " · ".join(f"{k} {v}" for k, v in st.tables.items()), highlight=False)
    t = Table(title="runs", title_justify="left")
    for c in ("run", "pipeline", "status", "started", "inputs", "clips", "failed", "clips/s"):
        t.add_column(c, overflow="fold", min_width={"pipeline": 6, "status": 8, "started": 11}.get(c, len(c)))
    for r in st.runs:
        c = json.loads(r["counts_json"] or "{}")
        speed = c.get("clips", 0) / c["elapsed_s"] if c.get("elapsed_s") else 0
        t.add_row(r["run_id"], r["pipeline"], r["status"], str(r["started"])[5:16],
                  str(c.get("inputs_done", "")), str(c.get("clips", "")), str(c.get("failed_inputs", "")),
                  f"{speed:.1f}")
    stdout.print(t)
    t = Table(title="clips per source", title_justify="left")
    for c in ("source", "inputs", "clips", "hours"):
        t.add_column(c)
    for r in st.sources:
        t.add_row(*[str(v) for v in r.values()])
    stdout.print(t)
    t = Table(title="open failures by class", title_justify="left")
    for c in ("stage", "class", "permanent", "inputs"):
        t.add_column(c)
    for r in st.failures:
        t.add_row(r["stage"], r["error"], "yes" if r["permanent"] else "no (retry-failed)", str(r["inputs"]))
    stdout.print(t if st.failures else "[green]no open failures[/]")


@app.command(rich_help_panel=LAKE_PANEL)
def snapshots(lake: str = LAKE, limit: int = typer.Option(20, help="How many recent runs to list.")):
    """List the instants `soundlake sql --as-of` can read: each run that committed into the lake,
    the time of its last commit (UTC) and the tables it committed into, newest first."""
    from soundlake.catalog.delta import history
    from soundlake.catalog.lake import Lake

    lk = Lake(lake)
    if not lk.exists():
        raise UserError(f"no lake at {lake}: run `soundlake curate demo --lake {lake}` first")
    t = Table(title="snapshots (sql --as-of RUN or TIME)", title_justify="left")
    for c in ("run", "last commit (UTC)", "tables"):
        t.add_column(c, overflow="fold")
    for r in history(lk)[:limit]:
        t.add_row(r["run_id"], r["time"].isoformat(timespec="milliseconds"), ", ".join(sorted(r["tables"])))
    stdout.print(t)


@app.command(rich_help_panel=LAKE_PANEL)
def compact(lake: str = LAKE, target_mb: int = typer.Option(256, help="Size of the parts it writes, in MB."),
            wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
            catalog: str | None = CATALOG):
    """Rewrite each table's many small parts into few large ones (each table in one commit of its
    own: readers see the old parts or the new, never both). Queries and `status` get faster;
    `--as-of` still reads the old parts until `soundlake vacuum` deletes them."""
    from soundlake.catalog import delta
    from soundlake.catalog.lake import Lake
    from soundlake.pipelines.runner import new_run_id

    lk = Lake(lake)
    if not lk.exists():
        raise UserError(f"no lake at {lake}: run `soundlake curate demo --lake {lake}` first")
    run_id = new_run_id()
    t = Table(title=f"compact {run_id}", title_justify="left")
    for c in ("table", "parts before", "parts after"):
        t.add_column(c)
    with lk.lock(run_id, wait=wait):
        for table, before, after in delta.compact_all(lk, run_id, target_mb << 20):
            t.add_row(table, str(before), str(after))
    stdout.print(t if t.row_count else "nothing to compact: every table has at most one part")


@app.command(rich_help_panel=LAKE_PANEL)
def migrate(lake: str = LAKE,
            wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
            catalog: str | None = CATALOG):
    """Bring a lake written by an earlier soundlake onto the table format: each table folder
    without a commit log gets one that lists the parts already in it (they are not rewritten),
    and commits a killed job left half done are finished. Every writing command does this on
    its own; run it to do it now, e.g. before pointing several writers at the lake."""
    from soundlake.catalog import delta, schema
    from soundlake.catalog.lake import Lake
    from soundlake.pipelines.runner import new_run_id

    lk = Lake(lake)
    if not lk.exists():
        raise UserError(f"no lake at {lake}: nothing to migrate")
    before = {t: len(lk.glob_parts(t)) for t in schema.TABLES if delta.uses_log(t) and not delta.has_log(lk, t)}
    half_done = len(delta.pending(lk))
    with lk.lock(new_run_id(), wait=wait):   # taking the lock is what migrates
        pass
    for table, n in before.items():
        if n:
            stdout.print(f"{table}: {n} parts now listed in its commit log")
    if half_done:
        stdout.print(f"finished {half_done} commits a killed job had left half done")
    moved = sum(1 for n in before.values() if n)
    stdout.print(f"migrated {moved} tables" if moved or half_done else "nothing to migrate: every table has its "
                 "commit log")


@app.command(rich_help_panel=LAKE_PANEL)
def vacuum(lake: str = LAKE,
           older_than: int = typer.Option(168, "--older-than", help="Hours: only files older than this go "
                                            "(and with them `--as-of` before that)."),
           wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
           catalog: str | None = CATALOG):
    """Delete part files that no table's current snapshot lists: those `compact` replaced, those
    a killed run's tasks wrote but never got committed, and those of dedup and eval-set
    snapshots replaced before --older-than. Holds the lake's lock, so no job is writing
    meanwhile."""
    from soundlake.catalog import delta, snapshots
    from soundlake.catalog.lake import Lake
    from soundlake.pipelines.runner import new_run_id

    lk = Lake(lake)
    if not lk.exists():
        raise UserError(f"no lake at {lake}: run `soundlake curate demo --lake {lake}` first")
    if older_than < 0:
        raise UserError(f"--older-than {older_than}: expected hours >= 0")
    with lk.lock(new_run_id(), wait=wait):
        n = delta.vacuum(lk, older_than) + snapshots.vacuum(lk, older_than)
    stdout.print(f"deleted {n} part files older than {older_than} h that no snapshot lists")


@report_app.command("thresholds")
def report_thresholds(
    lake: str = LAKE,
    out: Path = typer.Option(Path("thresholds.html"), "--out", "-o", help="HTML report (a .md beside it too)."),
    thresholds: str = typer.Option("0.30,0.35,0.40,0.45,0.50", help="Comma-separated CLAP score thresholds."),
    model: Optional[str] = typer.Option(None, help="CLAP model id (needed when the lake has scores from several)."),
):
    """Per source and captioner: the CLAP score distribution and how many caption pairs each threshold keeps.

    Writes --out (HTML) and the same report as Markdown beside it, and prints the Markdown.
    Scores stay raw in the lake; thresholds are applied at query and export time."""
    from rich.markdown import Markdown

    from soundlake.catalog.report import threshold_report

    try:
        ts = [float(x) for x in thresholds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--thresholds {thresholds!r}: expected numbers like 0.35,0.40") from None
    rep = threshold_report(lake, ts, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rep.html())
    out.with_suffix(".md").write_text(rep.markdown())
    console.print(Markdown(rep.markdown()))
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


def load_clap(path: str):
    """The CLAP model for text search, imported only when a query uses it (torch is slow to import)."""
    from soundlake.models.clap.load import load_clap as load

    return load(path)
