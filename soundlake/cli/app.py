"""The `soundlake` command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from soundlake.core.errors import UserError

app = typer.Typer(
    help="Curate audio–caption datasets into a DuckDB/Parquet lake with Ray, query them with SQL, "
         "export training shards and retrain text-to-audio generators.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

LAKE = typer.Option("./lake", "--lake", "-l", help="Lake root: a folder or an object-store URI (s3://...).")


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


@app.command()
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Run a curation pipeline into the lake.

    Re-running the same command resumes: committed inputs are skipped, so a killed run finishes the rest without duplicates."""
    from soundlake.pipelines.runner import run_pipeline
    from soundlake.pipelines.spec import load_spec

    try:
        spec = load_spec(pipeline, overrides={
            "source.input": str(input) if input else None, "source.limit": limit,
            "source.manifest": str(manifest) if manifest else None,
            "source.ontology": str(ontology) if ontology else None,
            "freesound.query": query, "freesound.filter": filter,
            "ray.num_cpus": num_cpus, "ray.address": address}, sets=set_)
    except UserError as e:
        _fail(e)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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
        with progress:
            summary = run_pipeline(spec, lake, wait=wait, on_start=on_start, on_progress=on_progress)
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: committed work is kept; run the same command again to resume")
        raise typer.Exit(130)
    _print_summary(summary)


def _print_summary(s) -> None:
    t = Table(title=f"run {s.run_id} {s.status}", show_header=False, title_justify="left")
    t.add_row("inputs", f"{s.inputs_total} listed · {s.inputs_skipped} already in the lake · {s.inputs_done} processed"
              + (f" · {s.non_audio_skipped} non-audio files ignored" if s.non_audio_skipped else ""))
    t.add_row("clips", f"{s.clips} new ({s.flac_bytes / 2**20:.1f} MiB FLAC)")
    failures = ", ".join(f"{k} {v}" for k, v in s.errors.most_common()) or "none"
    t.add_row("failures", f"{s.failed_inputs} inputs: {failures}")
    t.add_row("speed", f"{s.clips_per_s:.1f} clips/s over {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)")
    if s.rows:
        t.add_row("rows", " · ".join(f"{k} {v}" for k, v in sorted(s.rows.items())))
    for note in s.notes:
        t.add_row("note", note)
    t.add_row("lake", s.lake)
    t.add_row("next", f"soundlake sql \"SELECT source, count(*) FROM clips GROUP BY 1\" --lake {s.lake}")
    console.print(t)


@app.command()
def sql(
    query: str = typer.Argument(..., help="One SQL statement over the lake's views (clips, audio, captions, "
                                "failures, failures_open, runs, ...)."),
    lake: str = LAKE,
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result here (needed for parquet)."),
    max_rows: int = typer.Option(40, help="table format: rows to show."),
):
    """Query the lake with DuckDB SQL. Read-only, and safe while a curation job is running."""
    from soundlake.catalog.sql import query as run_query

    if format not in ("table", "csv", "json", "parquet"):
        _fail(UserError(f"--format {format!r}: expected table, csv, json or parquet"))
    if format == "parquet" and output is None:
        _fail(UserError("--format parquet needs --out FILE"))
    try:
        result = run_query(lake, query)
        if result is None:
            _fail(UserError("the statement returned no rows (only queries are supported)"))
    except UserError as e:
        _fail(e)
    # Never print raw audio bytes: show their size instead.
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
    out.print(t)
    if result.num_rows > max_rows:
        console.print(f"{result.num_rows} rows, {max_rows} shown (--max-rows, or --format csv)")
    else:
        console.print(f"{result.num_rows} row{'s' if result.num_rows != 1 else ''}")


def _printable(t):
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


@app.command()
def status(lake: str = LAKE, runs: int = typer.Option(10, help="How many recent runs to list.")):
    """Summarise a lake: runs, clips per source, table sizes, open failures by class."""
    from soundlake.catalog.status import lake_status

    try:
        st = lake_status(lake, runs)
    except UserError as e:
        _fail(e)
    out.print(f"[bold]lake[/] {st.lake} · " + ("[yellow]a job is writing now[/]" if st.writing else "idle")
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
    out.print(t)
    t = Table(title="clips per source", title_justify="left")
    for c in ("source", "inputs", "clips", "hours"):
        t.add_column(c)
    for r in st.sources:
        t.add_row(*[str(v) for v in r.values()])
    out.print(t)
    t = Table(title="open failures by class", title_justify="left")
    for c in ("stage", "class", "permanent", "inputs"):
        t.add_column(c)
    for r in st.failures:
        t.add_row(r["stage"], r["error"], "yes" if r["permanent"] else "no (retry-failed)", str(r["inputs"]))
    out.print(t if st.failures else "[green]no open failures[/]")


@app.command()
def export(
    out_dir: str = typer.Option(..., "--out", "-o", help="Shard folder or object-store URI (s3://bucket/prefix)."),
    lake: str = LAKE,
    where: Optional[str] = typer.Option(None, help="SQL condition over the clips view, e.g. \"source = 'synth'\"."),
    caption: str = typer.Option("preferred", help="preferred | all | a captioner name (reference, template, ...)."),
    min_score: Optional[float] = typer.Option(None, help="Keep captions whose CLAP score is at least this."),
    score_model: Optional[str] = typer.Option(None, help="The CLAP model id whose scores --min-score reads."),
    license: Optional[str] = typer.Option(None, help="Comma-separated licenses to keep, e.g. CC0,CC-BY."),
    exclude: List[Path] = typer.Option([], help="File of clip ids or source ids to leave out (one per line, "
                                       "# comments), e.g. AudioCaps test YTIDs. Repeatable."),
    split: Optional[str] = typer.Option(None, help="Held-out splits by a stable hash of the clip id, "
                                        "e.g. valid=0.01,test=0.01 (the rest is train)."),
    shard_size: Optional[str] = typer.Option(None, help="Bytes per shard, e.g. 512MB (default)."),
    shard_count: Optional[int] = typer.Option(None, min=1, help="Samples per shard instead of --shard-size."),
    name: Optional[str] = typer.Option(None, help="A name for the export in the exports table."),
    wait: bool = typer.Option(False, help="Wait for a running job's lake lock to record the export."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-shard progress."),
):
    """Export a SQL selection as WebDataset shards with a manifest, and record it in the lake.

    Re-running the same command resumes a killed export without rewriting finished shards."""
    from soundlake.export.exporter import (
        ExportArgs,
        parse_size,
        parse_splits,
        run_export,
    )

    try:
        if shard_size and shard_count:
            raise UserError("give --shard-size or --shard-count, not both")
        args = ExportArgs(
            out=out_dir, where=where, caption=caption, min_score=min_score, score_model=score_model,
            licenses=[x.strip() for x in (license or "").split(",") if x.strip()],
            exclude=[str(p) for p in exclude], splits=parse_splits(split),
            shard_size=None if shard_count else parse_size(shard_size or "512MB"),
            shard_count=shard_count, name=name)

        def on_shard(sh, done, total):
            if not quiet:
                console.print(f"shard {done}/{total} {sh['name']} ({sh['end'] - sh['start']} clips)", highlight=False)
        r = run_export(lake, args, wait=wait, on_shard=on_shard)
    except UserError as e:
        _fail(e)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(r.splits.items()))
    dropped = ", ".join(f"{k} {v}" for k, v in r.dropped.items() if v) or "none"
    console.print(f"export [bold]{r.export_id}[/] · {r.clips} clips ({splits}) · {r.shards} shards "
                  f"({r.written} written, {r.kept} already done) · {r.bytes / 2**20:.1f} MiB · dropped: {dropped}",
                  highlight=False)
    console.print(f"manifest {r.out}/manifest.json · recorded in the lake: "
                  + ("yes" if r.recorded else "already"), highlight=False)


report_app = typer.Typer(help="Reports on the lake's contents.", no_args_is_help=True)
app.add_typer(report_app, name="report")


@report_app.command("thresholds")
def report_thresholds(
    lake: str = LAKE,
    out: Path = typer.Option(Path("thresholds.html"), "--out", "-o", help="HTML report (a .md beside it too)."),
    thresholds: str = typer.Option("0.30,0.35,0.40,0.45,0.50", help="Comma-separated CLAP score thresholds."),
    model: Optional[str] = typer.Option(None, help="CLAP model id (needed when the lake has scores from several)."),
):
    """Per source and captioner: the CLAP score distribution and how many caption pairs each threshold keeps (scores stay raw; thresholds are applied at query and export time)."""
    from soundlake.catalog.report import threshold_report

    try:
        ts = [float(x) for x in thresholds.split(",") if x.strip()]
    except ValueError:
        _fail(UserError(f"--thresholds {thresholds!r}: expected numbers like 0.35,0.40"))
    try:
        rep = threshold_report(lake, ts, model)
    except UserError as e:
        _fail(e)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rep.html())
    out.with_suffix(".md").write_text(rep.markdown())
    from rich.markdown import Markdown

    console.print(Markdown(rep.markdown()))
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


@app.command()
def recaption(
    lake: str = LAKE,
    captioner: str = typer.Option("qwen", help="The audio captioner (qwen: Qwen2-Audio)."),
    model: str = typer.Option(..., help="Folder of a Qwen2-Audio checkpoint (base or instruct)."),
    refine: Optional[str] = typer.Option(None, help="Folder of a text LLM (causal LM with a chat template) that "
                                         "rewrites each caption with the clip's title, tags and labels."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips (c.*), e.g. \"c.source = 'audioset'\"."),
    prompt_version: Optional[str] = typer.Option(None, help="qwen-base-v1 | qwen-instruct-v1 (default: from the "
                                                 "folder name)."),
    batch_size: int = typer.Option(8, help="Clips per model call."),
    num_gpus: float = typer.Option(0.0, help="GPUs per model actor."),
    concurrency: int = typer.Option(1, help="Actors per model."),
    limit: Optional[int] = typer.Option(None, help="Caption at most this many clips."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
):
    """Caption clips already in the lake with an audio LLM (and refine them with a text LLM).

    Resumable: clips that already have this captioner's caption (same model and prompt version) are skipped. Refined captions are linted; failures land in `failures`."""
    from soundlake.core.ray_env import RaySpec
    from soundlake.pipelines.recaption import RecaptionArgs
    from soundlake.pipelines.recaption import recaption as run_recaption

    if captioner != "qwen":
        _fail(UserError(f"--captioner {captioner!r}: only qwen is available (autocap: soundlake train captioner)"))
    args = RecaptionArgs(model=model, refine=refine, where=where, prompt_version=prompt_version,
                         batch_size=batch_size, num_gpus=num_gpus, concurrency=concurrency, limit=limit)
    try:
        s = run_recaption(lake, args, RaySpec(num_cpus=num_cpus, address=address), wait=wait)
    except (UserError, ValueError, OSError) as e:
        _fail(e)
    console.print(f"run {s.run_id} {s.status}: {s.inputs_total} clips to caption · "
                  + (" · ".join(f"{k} {v}" for k, v in sorted(s.rows.items())) or "nothing new")
                  + f" · {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)", highlight=False)


evaluate_app = typer.Typer(help="Measure quality: captions against references.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.command("captions")
def evaluate_captions_cmd(
    lake: str = LAKE,
    references: str = typer.Option("reference", help="'reference' (all reference captions) or a reference "
                                   "model id such as human or synth-v1."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips, e.g. \"source = 'synth'\"."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the scores as JSON here."),
):
    """BLEU-1/4, ROUGE-L, CIDEr-D, MiniLM embedding similarity and a SPIDEr-style mean for each captioner's captions against the lake's reference captions."""
    from soundlake.models.caption_eval import evaluate_captions

    try:
        res = evaluate_captions(lake, references, where)
    except UserError as e:
        _fail(e)
    t = Table(title=f"captions vs {references} references", title_justify="left")
    cols = ["bleu_1", "bleu_4", "rouge_l", "cider_d", "sbert_sim", "spider_style"]
    for c in ["captioner", "clips"] + cols:
        t.add_column(c)
    for name, m in res.items():
        t.add_row(name, str(m["n"]), *[f"{m[c]:.3f}" for c in cols])
    out.print(t)
    if output:
        output.write_text(json.dumps(res, indent=2))
        console.print(f"wrote {output}")


train_app = typer.Typer(help="Train the project's own models from the lake.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("clap")
def train_clap_cmd(
    lake: str = LAKE,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the model in (loadable by clap.model)."),
    captioner: str = typer.Option("reference", help="Train on this captioner's captions."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips (c.*), e.g. \"c.source = 'synth'\"."),
    holdout: float = typer.Option(0.1, help="Fraction of clips (stable hash of clip_id) held out for validation."),
    epochs: int = typer.Option(30, help="Training epochs."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(2e-3),
    dim: int = typer.Option(256, help="Shared embedding size."),
    seed: int = typer.Option(0),
):
    """Train the in-house CLAP: frozen MiniLM text tower (offline) + a log-mel CNN audio encoder, contrastive loss, on the lake's clips and captions.

    Prints validation retrieval each epoch."""
    from soundlake.catalog.training_pairs import load_pairs
    from soundlake.models.clap.inhouse import ClapTrainConfig, train_clap

    cfg = ClapTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, dim=dim, seed=seed)
    try:
        train, held = load_pairs(lake, cfg.sample_rate, captioner=captioner, where=where, holdout=holdout)
    except UserError as e:
        _fail(e)
    console.print(f"training on {len(train)} clips, validating on {len(held)} (lake {lake})")
    from rich.progress import Progress

    with Progress(console=console) as progress:
        task = progress.add_task("epochs", total=epochs)

        def report(row):
            progress.update(task, advance=1)
            extra = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds")
                             and isinstance(v, float))
            progress.console.print(f"epoch {row['epoch']:3d}  {extra}", highlight=False)

        res = train_clap([a for _, a, _ in train], [c for _, _, c in train], out, cfg, progress=report,
                         val=([a for _, a, _ in held], [c for _, _, c in held]) if len(held) >= 2 else None)
    console.print(f"saved {out} in {res['train_seconds']:.0f} s · checkpoint {res['identity'].get('checkpoint_sha256')}"
                  f"\nuse it: soundlake curate demo --lake {lake} --set clap.model={out}", highlight=False)


def _train_cmd(kind: str, spec_file: Optional[Path], sets: List[str], **given) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from soundlake.generation.train.specs import load_train_spec
    from soundlake.generation.train.trainer import train

    try:
        spec = load_train_spec(kind, str(spec_file) if spec_file else None, sets, **given)
    except UserError as e:
        _fail(e)
    stages = " → ".join(f"{s.name} ({s.mode if kind == 'dit' else 'recon'}, {s.steps} steps, {s.shards})"
                        for s in spec.stages)
    console.print(f"train {kind} · config {spec.config} · {spec.workers} worker(s) × batch {spec.batch_size} · "
                  f"{spec.seconds:g} s crops · stages: {stages} · out {spec.out}", highlight=False)
    progress = Progress(TextColumn(f"[bold]train {kind}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
    task = progress.add_task(kind, total=spec.total_steps, info="starting Ray Train…")

    def on_progress(p):
        loss = f"loss {p['loss']:.4f}" if p.get("loss") is not None else ""
        progress.update(task, completed=p["step"],
                        info=f"{p['stage']} · {loss} · {p['samples_per_s']:.1f} samples/s")
    try:
        with progress:
            s = train(spec, on_progress)
    except UserError as e:
        _fail(e)
    t = Table(title=f"train {kind} done", show_header=False, title_justify="left")
    t.add_row("steps", f"{s.steps}" + (f" (resumed at {s.resumed_from})" if s.resumed_from else ""))
    t.add_row("speed", f"{s.samples_per_s:.1f} samples/s over {s.elapsed_s:.1f} s (+ {s.ray_startup_s:.1f} s Ray start-up)")
    if s.final_loss is not None:
        t.add_row("final loss", f"{s.final_loss:.4f} (last log row; the curve: {s.out}/train_log.csv)")
    t.add_row("model", s.out)
    t.add_row("checkpoint", s.checkpoint)
    t.add_row("next", f"soundlake encode --vae {s.out} --shards <export> --out <latents>" if kind == "vae"
              else f"soundlake generate --model {s.out} \"a high beep repeats\" --out beep.wav")
    console.print(t)


_SPEC_HELP = "YAML train spec (settings and stages); options and --set override it."
_SET_HELP = "Override a spec key: key=value, e.g. --set lr=1e-4 --set overrides.depth=6. Repeatable."


@train_app.command("vae")
def train_vae_cmd(
    shards: Optional[str] = typer.Option(None, help="Export folder (or URI) with audio shards."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, log and the model."),
    config: Optional[str] = typer.Option(None, help="Model config: vae-tiny (CPU, default), vae-ezaudio, or a YAML."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per step per worker."),
    seconds: Optional[float] = typer.Option(None, help="Crop length in seconds."),
    lr: Optional[float] = typer.Option(None),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers (DDP)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="One GPU per worker."),
    spec: Optional[Path] = typer.Option(None, help=_SPEC_HELP),
    set_: List[str] = typer.Option([], "--set", "-s", help=_SET_HELP),
):
    """Train the waveform VAE on Ray Train from exported shards (resumes from the newest checkpoint in --out)."""
    _train_cmd("vae", spec, set_, shards=shards, out=out, config=config, steps=steps, batch_size=batch_size,
               seconds=seconds, lr=lr, workers=workers, use_gpu=gpu)


@train_app.command("dit")
def train_dit_cmd(
    shards: Optional[str] = typer.Option(None, help="Latent shards written by `soundlake encode`."),
    vae: Optional[str] = typer.Option(None, help="The VAE folder that encoded them."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder: checkpoints, log and the model."),
    config: Optional[str] = typer.Option(None, help="Model config: dit-tiny (CPU, default), dit-L, dit-XL, or a YAML."),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps (one text-conditioned stage)."),
    batch_size: Optional[int] = typer.Option(None, help="Clips per step per worker."),
    seconds: Optional[float] = typer.Option(None, help="Crop length in seconds."),
    lr: Optional[float] = typer.Option(None),
    text_encoder: Optional[str] = typer.Option(None, help="transformers encoder folder (e.g. FLAN-T5); default MiniLM."),
    init: Optional[str] = typer.Option(None, help="Start from this DiT folder's weights (weights only)."),
    workers: Optional[int] = typer.Option(None, help="Ray Train workers (DDP)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="One GPU per worker."),
    spec: Optional[Path] = typer.Option(None, help=_SPEC_HELP + " Stages: masked pretraining, text, fine-tuning."),
    set_: List[str] = typer.Option([], "--set", "-s", help=_SET_HELP),
):
    """Train the EzAudio-style DiT on VAE latent shards on Ray Train (v-prediction, condition dropout for CFG).

    Resumes from the newest checkpoint in --out. The model folder holds its VAE, so `soundlake generate --model OUT` needs nothing else."""
    _train_cmd("dit", spec, set_, shards=shards, vae=vae, out=out, config=config, steps=steps,
               batch_size=batch_size, seconds=seconds, lr=lr, text_encoder=text_encoder, init=init,
               workers=workers, use_gpu=gpu)


@app.command()
def encode(
    vae: str = typer.Option(..., help="Trained VAE folder (soundlake train vae)."),
    shards: str = typer.Option(..., help="Export folder (or URI) with audio shards."),
    out: str = typer.Option(..., "--out", "-o", help="Folder (or URI) for the latent shards."),
    split: Optional[str] = typer.Option(None, help="Only this split (default: all)."),
    batch_size: int = typer.Option(16, help="Clips per VAE call."),
    concurrency: int = typer.Option(1, help="VAE actors."),
    num_gpus: float = typer.Option(0.0, help="GPUs per actor."),
    keep_audio: bool = typer.Option(False, help="Keep each sample's FLAC beside its latents."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
):
    """Pre-encode audio shards into VAE latent shards with Ray Data (one latent shard per audio shard; resumable)."""
    from rich.progress import Progress

    from soundlake.core.ray_env import RaySpec, init_ray
    from soundlake.generation.train.encode import encode_shards

    init_ray(RaySpec(address=address, num_cpus=num_cpus))
    try:
        with Progress(console=console) as progress:
            task = progress.add_task("encode", total=None)

            def on_shard(row, done, total):
                progress.update(task, completed=done, total=total)
                if row["error"]:
                    progress.console.print(f"[red]failed[/] {row['name']}: {row['error']}", highlight=False)
            r = encode_shards(vae, shards, out, split=split, batch_size=batch_size, concurrency=concurrency,
                              num_gpus=num_gpus, keep_audio=keep_audio, on_shard=on_shard)
    except UserError as e:
        _fail(e)
    console.print(f"encoded {r.written} shards ({r.kept} already done) · {r.samples} samples · latent mean "
                  f"{r.mean:.4f} std {r.std:.4f} · {r.elapsed_s:.1f} s · {r.out}/manifest.json", highlight=False)
    if r.failed:
        console.print("[red]failed shards[/] (re-run to retry): " + "; ".join(r.failed), highlight=False)
        raise typer.Exit(1)


@app.command()
def generate(
    prompts: List[str] = typer.Argument(..., help="One or more text prompts."),
    model: str = typer.Option(..., help="Trained DiT folder (soundlake train dit)."),
    out: Path = typer.Option(Path("generated.wav"), "--out", "-o", help="WAV path (NAME-<i>.wav for several prompts); "
                             "a .json sidecar records every setting."),
    seconds: float = typer.Option(10.0, help="Length of the audio."),
    steps: int = typer.Option(100, help="Sampler steps."),
    sampler: str = typer.Option("ddim", help="ddim | euler | dpmpp_2m"),
    cfg: float = typer.Option(5.0, help="Classifier-free guidance scale (1 = off)."),
    rescale: float = typer.Option(0.75, help="CFG rescale φ (0 = off)."),
    rescale_axis: str = typer.Option("all", help="Std axis of the rescale: all (EzAudio) | time (stable-audio-tools)."),
    seed: int = typer.Option(0),
    sparse_attention: str = typer.Option("none", help="none | litefocus (sparse self-attention for long audio)."),
    ratio: float = typer.Option(0.1, help="litefocus: fraction of all keys each query also attends to."),
    window: Optional[int] = typer.Option(None, help="litefocus: local band in latent frames (default: the "
                                         "training crop's frames)."),
    reference: Optional[Path] = typer.Option(None, help="A reference clip for a DiT trained with a second "
                                             "condition stream (DC-LDM, cond2: latents)."),
):
    """Generate audio from text with a trained DiT and its VAE."""
    from contextlib import nullcontext

    import soundfile as sf
    from rich.progress import Progress

    from soundlake.generation.model_folder import Generator, write_audio

    if sparse_attention not in ("none", "litefocus"):
        _fail(UserError(f"--sparse-attention {sparse_attention!r}: expected none or litefocus"))
    try:
        gen = Generator.load(model)
        ref = None
        if reference is not None:
            from soundlake.core.audio import resample

            try:
                ref, sr = sf.read(str(reference), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise UserError(f"--reference {reference}: cannot decode ({e})") from None
            ref = resample(ref.mean(axis=1), sr, gen.sample_rate)
        ctx = nullcontext()
        if sparse_attention == "litefocus":
            from soundlake.generation.inference.litefocus import attach_sparse_attention

            train_frames = round(gen.meta["train"]["spec"]["seconds"] * gen.vae.latent_rate)
            band = window or train_frames
            # query chunks of half the band: each chunk's shared keys stay a small part of the sequence
            ctx = attach_sparse_attention(gen.dit, range(len(gen.dit.blocks)), window=band, ratio=ratio,
                                          seed=seed, chunk=max(16, band // 2), min_tokens=train_frames)
        with Progress(console=console) as progress, ctx:
            task = progress.add_task("sampling", total=steps)
            res = gen.generate(prompts, seconds=seconds, steps=steps, sampler=sampler, cfg=cfg, rescale=rescale,
                               rescale_axis=rescale_axis, seed=seed, reference=ref,
                               callback=lambda i, t, x: progress.update(task, completed=i + 1))
        if sparse_attention == "litefocus":
            res.meta |= {"sparse_attention": "litefocus", "ratio": ratio, "window": band, "chunk": max(16, band // 2)}
        paths = write_audio(res, out)
    except (UserError, ValueError) as e:
        _fail(e)
    for p in paths:
        console.print(f"wrote {p} ({seconds:g} s at {res.sample_rate} Hz; settings in {p.name}.json)", highlight=False)


@train_app.command("captioner")
def train_captioner_cmd(
    lake: str = LAKE,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the model in (loadable by caption.autocap_model)."),
    captioner: str = typer.Option("reference", help="Train on this captioner's captions."),
    where: Optional[str] = typer.Option(None, help="SQL condition on clips (c.*), e.g. \"c.source = 'synth'\"."),
    holdout: float = typer.Option(0.1, help="Fraction of clips (stable hash of clip_id) held out for validation."),
    clap: Optional[Path] = typer.Option(None, help="In-house CLAP folder used (frozen) as the audio encoder; "
                                        "default: train one on the same pairs first."),
    clap_epochs: int = typer.Option(12, help="Epochs of that CLAP, when --clap is not given."),
    stage1_epochs: int = typer.Option(2, help="Stage 1: BART frozen; Q-Former, projections, tag tokens train."),
    stage2_epochs: int = typer.Option(14, help="Stage 2: BART trains too, except its token embeddings."),
    batch_size: int = typer.Option(32),
    field_dropout: float = typer.Option(0.5, help="Chance of leaving each metadata field empty in training."),
    bart: Optional[Path] = typer.Option(None, help="A pretrained BART folder (its tokenizer too); default: a small "
                                        "BART from a config with a WordPiece vocabulary trained on the captions."),
    tokenizer: str = typer.Option("train", help="train (WordPiece on the training texts) or minilm (the MiniLM "
                                  "vocabulary shipped offline); ignored with --bart."),
    seed: int = typer.Option(0),
):
    """Train the in-house autocap (AutoCap architecture: Q-Former over frozen audio frames, CLAP token, tagged metadata, BART) on the lake's clips, captions and metadata, in two stages.

    Prints the loss and validation metrics each epoch."""
    from soundlake.catalog.training_pairs import clip_metadata, load_pairs
    from soundlake.models.captioners.autocap import AutocapConfig
    from soundlake.models.captioners.autocap_train import (
        AutocapTrainConfig,
        CaptionItem,
        train_autocap,
    )

    if tokenizer not in ("train", "minilm"):
        _fail(UserError(f"--tokenizer {tokenizer!r}: expected train or minilm"))
    cfg = AutocapConfig(bart=str(bart) if bart else None, tokenizer="bart" if bart else tokenizer)
    tcfg = AutocapTrainConfig(stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, batch_size=batch_size,
                              field_dropout=field_dropout, clap_epochs=clap_epochs, seed=seed)
    try:
        rate = 16000
        if clap:
            from soundlake.models.captioners.autocap import ClapAudio

            rate = ClapAudio(clap).sample_rate
        train, held = load_pairs(lake, rate, captioner=captioner, where=where, holdout=holdout)
        meta = clip_metadata(lake, [c for c, _, _ in train + held])
    except (UserError, ValueError) as e:
        _fail(e)
    items = [CaptionItem(a, t, meta.get(c, {})) for c, a, t in train]
    val = [CaptionItem(a, t, meta.get(c, {})) for c, a, t in held]
    console.print(f"training on {len(items)} clips, validating on {len(val)} (lake {lake})")
    from rich.progress import Progress

    total = stage1_epochs + stage2_epochs + (0 if clap else clap_epochs) + (0 if bart else tcfg.bart_epochs)
    with Progress(console=console) as progress:
        task = progress.add_task("epochs", total=total)

        def report(row):   # CLAP epochs, BART denoising epochs, then stage 1 and 2 epochs
            progress.update(task, advance=1)
            if "clap_epoch" in row:
                name, num = "clap epoch", row["clap_epoch"]
            elif "bart_epoch" in row:
                name, num = "bart denoising epoch", row["bart_epoch"]
            else:
                name, num = f"stage {row['stage']} epoch", row["epoch"]
            extra = " ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and "seconds" not in k)
            progress.console.print(f"{name} {num:3d}  {extra}", highlight=False)

        try:
            res = train_autocap(items, out, cfg, tcfg, clap=clap, val=val or None, progress=report)
        except (UserError, ValueError) as e:
            _fail(e)
    model = res["model"]
    console.print(f"saved {out} in {res['train_seconds']:.0f} s · checkpoint {model.model_hash}\n"
                  f"use it: soundlake curate demo --lake {lake} --set 'caption.captioners=[template,autocap]' "
                  f"--set caption.autocap_model={out}", highlight=False, markup=False)


convert_app = typer.Typer(help="Convert released checkpoints into folders soundlake loads.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("autocap")
def convert_autocap_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="GenAU's released AutoCap checkpoint (autocap-full.ckpt)."),
    yaml_file: Path = typer.Option(..., "--yaml", help="Its settings file (autocap-full.yaml)."),
    bart: Optional[Path] = typer.Option(None, help="Folder of facebook/bart-base (config.json + tokenizer files); "
                                        "needed unless it is in the local Hugging Face cache."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (loadable by caption.autocap_model)."),
):
    """Convert the released AutoCap (HTS-AT encoder, laion-CLAP, Q-Former, BART) into an autocap folder.

    Every checkpoint tensor is placed or accounted for (duplicates, constants, unused classification
    heads); the STFT kernels, mel filters and resampler kernel are checked against their formulas."""
    from soundlake.models.captioners.autocap_release import convert_released

    with console.status("reading and mapping the checkpoint"):
        try:
            folder, report = convert_released(ckpt, yaml_file, out, bart=bart)
        except (UserError, ValueError) as e:
            _fail(e)
    console.print(f"wrote {folder}: {report.summary()}\n"
                  f"use it: soundlake curate demo --lake ./lake --set 'caption.captioners=[template,autocap]' "
                  f"--set caption.autocap_model={folder}", highlight=False, markup=False)


@app.command("retry-failed")
def retry_failed(
    lake: str = LAKE,
    class_: str = typer.Option("timeout,rate_limited,server_error,network,bot_wall", "--class",
                               help="Comma-separated failure classes to re-queue."),
    source: Optional[str] = typer.Option(None, help="Only this source (audioset, vggsound, freesound, local...)."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use (default: all)."),
    wait: bool = typer.Option(False, help="If another job is writing to the lake, wait for it."),
):
    """Re-queue the inputs whose open failures have these classes, through the same pipeline (the config of the run that listed them) with attempt + 1."""
    from soundlake.core.errors import ERROR_CLASSES
    from soundlake.pipelines.retry import retry_inputs, spec_of_run
    from soundlake.pipelines.runner import run_pipeline

    classes = [c.strip() for c in class_.split(",") if c.strip()]
    unknown = [c for c in classes if c not in ERROR_CLASSES]
    if unknown:
        _fail(UserError(f"--class {','.join(unknown)}: unknown; classes are {', '.join(ERROR_CLASSES)}"))
    try:
        groups = retry_inputs(lake, classes, source)
        if not groups:
            console.print(f"nothing to retry: no open failures of class {', '.join(classes)}")
            return
        for run_id, rows in groups.items():
            spec = spec_of_run(lake, run_id)
            spec.ray.address = address or spec.ray.address
            spec.ray.num_cpus = num_cpus or spec.ray.num_cpus
            console.print(f"retrying {len(rows)} inputs of run {run_id} ({spec.name})", highlight=False)
            _print_summary(run_pipeline(spec, lake, wait=wait, rows=rows))
    except UserError as e:
        _fail(e)


# --------------------------------------------------------------------------- cached inference evaluation
# calibrate-cache, and `evaluate` run without a subcommand (the logic: soundlake.generation.inference.evaluate)


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(UserError(f"{option} {text!r}: expected comma-separated numbers like 0,0.1,0.2"))


def _sampling_args(steps: int, sampler: str, cfg: float, rescale: float, rescale_axis: str, seed: int,
                   batch_size: int = 8):
    from soundlake.generation.diffusion import RESCALE_AXES, SAMPLERS
    from soundlake.generation.inference.evaluate import Sampling

    if sampler not in SAMPLERS:
        _fail(UserError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}"))
    if rescale_axis not in RESCALE_AXES:
        _fail(UserError(f"--rescale-axis {rescale_axis!r}: expected one of {', '.join(RESCALE_AXES)}"))
    return Sampling(steps=steps, sampler=sampler, cfg=cfg, rescale=rescale, rescale_axis=rescale_axis,
                    seed=seed, batch_size=batch_size)


def _steps_progress(quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("model steps"), TimeRemainingColumn(), console=console, disable=quiet)


def _load_generator(model: Path, device: str):
    from soundlake.generation.model_folder import Generator

    try:
        return Generator.load(model, device=device)
    except UserError as e:
        _fail(e)


SAMPLING_HELP = {"steps": "Sampler steps (a profile is per sampler and step count).",
                 "sampler": "ddim | euler | dpmpp_2m.", "cfg": "Classifier-free guidance scale.",
                 "rescale": "CFG rescale phi.", "rescale_axis": "CFG rescale std axis: all | time.",
                 "seconds": "Clip length in seconds (default: the model's training length, else 10).",
                 "device": "cpu, cuda, cuda:1 ..."}


@app.command("calibrate-cache")
def calibrate_cache_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A trained DiT folder (soundlake train dit)."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Calibration captions: a text file (one per line) "
                                 "or a .jsonl with \"caption\"."),
    steps: int = typer.Option(100, min=1, help=SAMPLING_HELP["steps"]),
    sampler: str = typer.Option("ddim", help=SAMPLING_HELP["sampler"]),
    cfg: float = typer.Option(5.0, help=SAMPLING_HELP["cfg"]),
    rescale: float = typer.Option(0.75, help=SAMPLING_HELP["rescale"]),
    rescale_axis: str = typer.Option("all", help=SAMPLING_HELP["rescale_axis"]),
    seconds: Optional[float] = typer.Option(None, min=0.01, help=SAMPLING_HELP["seconds"]),
    limit: Optional[int] = typer.Option(None, min=1, help="Calibrate on at most this many prompts."),
    seed: int = typer.Option(0, help="Noise seed of the first prompt (prompt i uses seed + i)."),
    plot: Optional[Path] = typer.Option(None, help="PNG of the change-rate curves (default: beside the profile)."),
    device: str = typer.Option("cpu", help=SAMPLING_HELP["device"]),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Measure each DiT layer's change rate per sampling step (AudioCache Eq. 1) over a prompt set and save the profile beside the model (audiocache_<sampler>_<steps>.json), with a PNG of the curves.

    `soundlake evaluate --model` (and cached generation) use that profile: a layer is recomputed once its accumulated change reaches delta."""
    import time

    from soundlake.generation.inference.audiocache import profile_path
    from soundlake.generation.inference.evaluate import (
        calibrate_cache,
        change_rate_png,
        planned_fraction,
        profile_summary,
        read_prompts,
        training_seconds,
    )

    sampling = _sampling_args(steps, sampler, cfg, rescale, rescale_axis, seed)
    try:
        captions = [p.caption for p in read_prompts(prompts)][:limit]
    except UserError as e:
        _fail(e)
    gen = _load_generator(model, device)
    seconds = seconds or training_seconds(gen) or 10.0
    t0 = time.perf_counter()
    with _steps_progress(quiet) as progress:
        task = progress.add_task("calibrating", total=len(captions) * steps)
        prof = calibrate_cache(gen, captions, sampling, seconds, lambda n, _: progress.advance(task, n))
    elapsed = time.perf_counter() - t0
    path = profile_path(model, sampler, steps)
    plot = plot or path.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot.write_bytes(change_rate_png(prof))
    summ = profile_summary(prof)
    t = Table(title=f"AudioCache profile · {model}", show_header=False, title_justify="left")
    t.add_row("calibrated", f"{summ['layers']} layers ({summ['blocks']} blocks × self_attn, cross_attn, ff) · "
              f"{steps} {sampler} steps · {len(captions)} prompts of {seconds:g} s · {elapsed:.0f} s")
    for kind, rate in summ["mean_rate"].items():
        t.add_row(f"{kind}", f"mean change {rate:.4f} per step (max {summ['max_rate'][kind]:.4f}), "
                  f"{summ['total_change'][kind]:.2f} over the run")
    t.add_row("planned cut", " · ".join(f"δ={d:g}: {1 / planned_fraction(prof, steps, d):.2f}x"
                                        for d in (0.1, 0.2, 0.3, 0.4)) + " fewer layer evaluations")
    t.add_row("profile", str(path))
    t.add_row("plot", str(plot))
    t.add_row("next", f"soundlake evaluate --model {model} --prompts {prompts} --steps {steps} "
              f"--cache-delta 0,0.1,0.2,0.3,0.4 --clap CLAP --out reports/cache")
    out.print(t)


EVALUATE_HELP = (
    "Measure quality and speed. Subcommand `captions`: captions against references. Without a subcommand "
    "(`soundlake evaluate --model runs/dit --prompts eval.jsonl --clap CLAP`): generate the prompt set "
    "uncached, with AudioCache at each --cache-delta, and with full vs --sparse-attention at each of "
    "--durations; measure wall time, layer evaluations, FD, KL, IS and CLAP score; write a report "
    "(report.md, report.html with plots, report.json) to --out.")


@evaluate_app.callback(invoke_without_command=True, no_args_is_help=True, help=EVALUATE_HELP)
def evaluate_generation_cmd(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A trained DiT folder (soundlake train dit)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", "-p", help="A .jsonl ({\"caption\": ..., "
                                           "\"audio\": reference clip, optional}) or a text file of captions."),
    steps: int = typer.Option(100, min=1, help=SAMPLING_HELP["steps"]),
    cache_delta: str = typer.Option("0,0.1,0.2,0.3,0.4", help="AudioCache thresholds to run (comma-separated; "
                                    "'' for none). The uncached run is always made."),
    sparse_attention: Optional[str] = typer.Option(None, help="litefocus: add full vs sparse self-attention rows."),
    ratio: float = typer.Option(0.1, min=0.0, max=1.0, help="Sparse attention: fraction of random keys."),
    durations: Optional[str] = typer.Option(None, help="Sparse attention: clip lengths in seconds (default: "
                                            "--seconds and 4x the training length)."),
    seconds: Optional[float] = typer.Option(None, min=0.01, help=SAMPLING_HELP["seconds"]),
    sampler: str = typer.Option("ddim", help=SAMPLING_HELP["sampler"]),
    cfg: float = typer.Option(5.0, help=SAMPLING_HELP["cfg"]),
    rescale: float = typer.Option(0.75, help=SAMPLING_HELP["rescale"]),
    rescale_axis: str = typer.Option("all", help=SAMPLING_HELP["rescale_axis"]),
    max_reuse: Optional[int] = typer.Option(None, min=0, help="AudioCache: at most this many reuses in a row."),
    clap: Optional[Path] = typer.Option(None, help="CLAP for FD/KL/IS/CLAP score: an in-house folder (soundlake "
                                        "train clap), a ClapModel folder or a laion-clap .pt."),
    labels: str = typer.Option("audioset", help="Zero-shot classes for KL and IS: audioset, or a text file "
                               "(one label per line)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per sampling call."),
    seed: int = typer.Option(0, help="Noise seed (batch i uses seed + i; the same noise for every setting)."),
    out_dir: Path = typer.Option(Path("reports/cache"), "--out", "-o", help="Report folder."),
    device: str = typer.Option("cpu", help=SAMPLING_HELP["device"]),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    if ctx.invoked_subcommand is not None:
        return
    from soundlake.generation.inference.evaluate import (
        EvalSettings,
        calibrate_cache,
        evaluate_generation,
        fmt_metric,
        load_profile,
        model_steps,
        read_prompts,
        training_seconds,
    )
    from soundlake.generation.inference.metrics import ClapFunctions
    from soundlake.models.clap.load import load_clap
    from soundlake.stages.clap import resolve_labels

    if model is None or prompts is None:
        _fail(UserError("give --model DIT and --prompts FILE (or a subcommand, e.g. `soundlake evaluate captions`)"))
    if clap is None:
        _fail(UserError("--clap PATH is needed for FD/KL/IS/CLAP: train one with `soundlake train clap`"))
    if sparse_attention not in (None, "litefocus"):
        _fail(UserError(f"--sparse-attention {sparse_attention!r}: the only method is litefocus"))
    sampling = _sampling_args(steps, sampler, cfg, rescale, rescale_axis, seed, batch_size)
    deltas = _floats(cache_delta, "--cache-delta")
    if any(d < 0 for d in deltas):
        _fail(UserError(f"--cache-delta {cache_delta!r}: thresholds must be >= 0"))
    try:
        items = read_prompts(prompts)
        label_set = resolve_labels(labels)
        clap_fns = ClapFunctions.of(load_clap(str(clap), device=device), label_set[1])
    except (UserError, ValueError, FileNotFoundError) as e:
        _fail(e)
    gen = _load_generator(model, device)
    seconds = seconds or training_seconds(gen) or 10.0
    durs = _floats(durations, "--durations") if durations else [seconds, 4 * (training_seconds(gen) or seconds)]
    settings = EvalSettings(deltas=deltas, seconds=seconds, durations=durs, max_reuse=max_reuse,
                            sparse_ratio=ratio if sparse_attention else None)
    with _steps_progress(quiet) as progress:
        profile, source = load_profile(gen, sampling), "loaded from beside the model"
        if profile is None and deltas:
            source = f"calibrated now on the {len(items)} evaluation prompts (no matching profile beside the model)"
            task = progress.add_task("calibrating", total=len(items) * steps)
            profile = calibrate_cache(gen, [p.caption for p in items], sampling, seconds,
                                      lambda n, _: progress.advance(task, n))
        task = progress.add_task("evaluating", total=model_steps(settings, sampling, len(items)))
        try:
            rep = evaluate_generation(gen, items, sampling, settings, clap_fns, label_set, profile,
                                      lambda n, what: progress.update(task, advance=n, description=what),
                                      profile_source=source)
        except UserError as e:
            _fail(e)
    paths = rep.write(out_dir)
    t = Table(title=f"cached inference · {model} · {len(items)} prompts · {steps} {sampler} steps · "
              f"reference: {'audio' if items[0].reference else 'uncached outputs'}", title_justify="left")
    for c in ("setting", "speed-up", "layers cut", "attn speed-up", "FD", "KL", "IS", "CLAP"):
        t.add_column(c, no_wrap=c == "setting")
    for r in rep.rows:
        t.add_row(r["setting"], f"{r['speedup']:.2f}x", f"{r['layer_cut']:.2f}x",
                  f"{r['attention_speedup']:.2f}x" if r["group"] == "sparse" else "",
                  *[fmt_metric(r[k], f) for k, f in (("fd", ".3f"), ("kl", ".3f"), ("is", ".2f"), ("clap", ".3f"))])
    out.print(t)
    console.print(f"wrote {', '.join(str(p) for p in paths if p.suffix != '.png')} (+ plots)", highlight=False)



def main() -> None:
    app()


if __name__ == "__main__":
    main()
