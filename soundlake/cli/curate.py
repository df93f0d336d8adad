"""`soundlake curate` and `soundlake retry-failed`: run pipelines into the lake, and print the run summary."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from soundlake.cli.main import CATALOG, CURATE, LAKE, VERBOSE, app, console
from soundlake.core.errors import UserError
from soundlake.core.ray_env import ray_log_file
from soundlake.core.storage import user_storage_errors
from soundlake.stages.segment import SegmentSpec, describe_skips


@app.command(rich_help_panel=CURATE)
def curate(
    pipeline: str = typer.Argument(..., help="A built-in pipeline (demo, local) or a path to a YAML spec."),
    lake: str = LAKE,
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="local: folder to scan recursively."),
    manifest: Optional[Path] = typer.Option(None, help="audioset/vggsound: the segment CSV."),
    ontology: Optional[Path] = typer.Option(None, help="audioset: ontology.json (default: bundled)."),
    query: Optional[str] = typer.Option(None, help="freesound: text search query."),
    filter: Optional[str] = typer.Option(None, "--filter", help="freesound: search filter, e.g. 'duration:[1 TO 30]'."),
    limit: Optional[int] = typer.Option(None, help="Process at most this many inputs."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a setting: key=value (YAML value), "
                                   "e.g. --set segment.sample_rate=48000. Repeatable."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use (default: all)."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster (e.g. auto or ray://host:10001)."),
    wait: bool = typer.Option(False, help="If another job is writing to the lake, wait for it instead of refusing."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
    compact: bool = typer.Option(False, "--compact", help="At the end, rewrite each table's small parts into "
                                 "large ones (as `soundlake compact` does): faster queries on a big lake."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verbose: bool = VERBOSE,
):
    """Run a curation pipeline into the lake.

    Lists the source's inputs, decodes and segments them into clips, captions, embeds, tags and
    scores them (as the pipeline says), and commits clips, captions, failures and the run record
    to the lake's tables. Prints a run summary. Re-running the same command resumes: committed
    inputs are skipped, so a killed run finishes the rest without duplicates."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from soundlake.pipelines.runner import run_pipeline
    from soundlake.pipelines.spec import load_spec

    spec = load_spec(pipeline, overrides={
        "source.input": str(input) if input else None, "source.limit": limit,
        "source.manifest": str(manifest) if manifest else None,
        "source.ontology": str(ontology) if ontology else None,
        "freesound.query": query, "freesound.filter": filter,
        "ray.num_cpus": num_cpus, "ray.address": address}, sets=set_)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                        disable=quiet, transient=False)
    task = None

    def on_start(s):
        nonlocal task
        console.print(f"run [bold]{s.run_id}[/] · pipeline {spec.name} · lake {s.lake} · "
                      f"{s.inputs_total} inputs, {s.inputs_skipped} already done", highlight=False)
        task = progress.add_task("curate", total=s.inputs_total - s.inputs_skipped, info="")

    def on_progress(s):
        progress.update(task, completed=s.inputs_done,
                        info=f"{s.clips} clips · {s.failed_inputs} failed · {s.clips_per_s:.1f} clips/s")

    try:
        with progress, user_storage_errors(f"lake {lake}"):
            summary = run_pipeline(spec, lake, wait=wait, on_start=on_start, on_progress=on_progress, compact=compact)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: committed work is kept; run the same command again to resume")
        raise typer.Exit(130)
    print_summary(summary, spec.segment)


@app.command("retry-failed", rich_help_panel=CURATE)
def retry_failed(
    lake: str = LAKE,
    class_: str = typer.Option("timeout,rate_limited,server_error,network,bot_wall", "--class",
                               help="Comma-separated failure classes to re-queue."),
    source: Optional[str] = typer.Option(None, help="Only this source (audioset, vggsound, freesound, local...)."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use (default: all)."),
    wait: bool = typer.Option(False, help="If another job is writing to the lake, wait for it."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
    verbose: bool = VERBOSE,
):
    """Re-run the inputs whose open failures have these classes (by default the transient ones).

    Each input goes through the same pipeline as before (the config of the run that listed it)
    with attempt + 1, as a new run in the lake. Prints a run summary per original run."""
    from soundlake.core.errors import ERROR_CLASSES
    from soundlake.pipelines.retry import retry_inputs, spec_of_run
    from soundlake.pipelines.runner import run_pipeline

    classes = [c.strip() for c in class_.split(",") if c.strip()]
    unknown = [c for c in classes if c not in ERROR_CLASSES]
    if unknown:
        raise UserError(f"--class {','.join(unknown)}: unknown; classes are {', '.join(ERROR_CLASSES)}")
    groups = retry_inputs(lake, classes, source)
    if not groups:
        console.print(f"nothing to retry: no open failures of class {', '.join(classes)}")
        return
    for run_id, rows in groups.items():
        spec = spec_of_run(lake, run_id)
        spec.ray.address = address or spec.ray.address
        spec.ray.num_cpus = num_cpus or spec.ray.num_cpus
        console.print(f"retrying {len(rows)} inputs of run {run_id} ({spec.name})", highlight=False)
        with user_storage_errors(f"lake {lake}"):
            summary = run_pipeline(spec, lake, wait=wait, rows=rows)
        print_summary(summary, spec.segment)


def print_summary(s, segment: SegmentSpec) -> None:
    """A finished run (pipelines.runner.RunSummary) as a table on stderr, with the next command to try."""
    t = Table(title=f"run {s.run_id} {s.status}", show_header=False, title_justify="left")
    t.add_row("inputs", f"{s.inputs_total} listed · {s.inputs_skipped} already in the lake · {s.inputs_done} processed"
              + (f" · {s.non_audio_skipped} non-audio files ignored" if s.non_audio_skipped else ""))
    t.add_row("clips", f"{s.clips} new ({s.flac_bytes / 2**20:.1f} MiB FLAC)")
    failures = ", ".join(f"{k} {v}" for k, v in s.errors.most_common()) or "none"
    t.add_row("failures", f"{s.failed_inputs} inputs: {failures}")
    if s.skipped:
        t.add_row("skipped", f"{sum(s.skipped.values())} inputs by policy: {describe_skips(s.skipped, segment)}")
    t.add_row("speed", f"{s.clips_per_s:.1f} clips/s over {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)")
    if s.rows:
        t.add_row("rows", " · ".join(f"{k} {v}" for k, v in sorted(s.rows.items())))
    for note in s.notes:
        t.add_row("note", note)
    t.add_row("lake", s.lake)
    if ray_log_file():
        t.add_row("ray log", f"{ray_log_file()} (Ray's own warnings; --verbose shows them here)")
    t.add_row("next", f"soundlake sql \"SELECT source, count(*) FROM clips GROUP BY 1\" --lake {s.lake}")
    console.print(t)
