"""`soundlake export`: a SQL selection of the lake as WebDataset training shards."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from soundlake.cli.main import CATALOG, LAKE, LAKE_PANEL, app, console
from soundlake.core.errors import UserError
from soundlake.core.storage import check_folder, user_storage_errors


@app.command(rich_help_panel=LAKE_PANEL)
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
    dedup: Optional[str] = typer.Option(None, help="Keep one clip per duplicate group: identity | fingerprint | "
                                        "semantic[:COSINE] | none (each level includes the stricter ones; "
                                        "default: fingerprint when `soundlake dedup` has run, else none)."),
    exclude_eval_sets: Optional[str] = typer.Option(None, help="Drop clips leaking into these eval sets: all or "
                                                    "NAME,... (soundlake eval-sets list)."),
    split: Optional[str] = typer.Option(None, help="Held-out splits by a stable hash of the clip id, "
                                        "e.g. valid=0.01,test=0.01 (the rest is train)."),
    shard_size: Optional[str] = typer.Option(None, help="Bytes per shard, e.g. 512MB (default)."),
    shard_count: Optional[int] = typer.Option(None, min=1, help="Samples per shard instead of --shard-size."),
    name: Optional[str] = typer.Option(None, help="A name for the export in the exports table."),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="Export the lake as it was: an export id (the "
                                        "versions it read: the same shards, byte for byte), a run id (the "
                                        "versions it left) or an ISO time. `soundlake snapshots` lists them."),
    wait: bool = typer.Option(False, help="Wait for a running job's lake lock to record the export."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-shard progress."),
):
    """Export a SQL selection as WebDataset shards with a manifest, and record it in the lake.

    Writes the shards (<split>-NNNNNN.tar: each clip's FLAC and its caption JSON) and manifest.json
    (with the duplicates and eval-set leakage left, by level) to --out, and records the export in the lake (exports, export_members). Re-running the same command resumes a killed export
    without rewriting finished shards."""
    from soundlake.export.exporter import (
        ExportArgs,
        parse_size,
        parse_splits,
        run_export,
    )

    if shard_size and shard_count:
        raise UserError("give --shard-size or --shard-count, not both")
    check_folder(out_dir, "--out")
    args = ExportArgs(
        out=out_dir, where=where, caption=caption, min_score=min_score, score_model=score_model,
        licenses=[x.strip() for x in (license or "").split(",") if x.strip()],
        exclude=[str(p) for p in exclude], splits=parse_splits(split),
        shard_size=None if shard_count else parse_size(shard_size or "512MB"),
        shard_count=shard_count, name=name, dedup=dedup,
        exclude_eval_sets=[x.strip() for x in (exclude_eval_sets or "").split(",") if x.strip()], as_of=as_of)

    def on_shard(sh, done, total):
        if not quiet:
            console.print(f"shard {done}/{total} {sh['name']} ({sh['end'] - sh['start']} clips)", highlight=False)
    with user_storage_errors(f"--out {out_dir}"):
        r = run_export(lake, args, wait=wait, on_shard=on_shard)
    splits = ", ".join(f"{k} {v}" for k, v in sorted(r.splits.items()))
    dropped = ", ".join(f"{k} {v}" for k, v in r.dropped.items() if v) or "none"
    console.print(f"export [bold]{r.export_id}[/] · {r.clips} clips ({splits}) · {r.shards} shards "
                  f"({r.written} written, {r.kept} already done) · {r.bytes / 2**20:.1f} MiB · dropped: {dropped}",
                  highlight=False)
    d, ev = r.screening.get("dedup", {}), r.screening.get("eval_sets", {})
    console.print(f"dedup {d.get('level')}: " + (d.get("note") or f"{d.get('dropped', 0)} duplicates dropped")
                  + " · eval sets " + (", ".join(f"{n}: " + (", ".join(f"{lv} {k}" for lv, k in x["leaking"].items())
                                                             or "not checked") + " leaking"
                                                 for n, x in ev.get("sets", {}).items()) or "none registered"),
                  highlight=False, markup=False)
    console.print(f"manifest {r.out}/manifest.json · recorded in the lake: "
                  + ("yes" if r.recorded else "already"), highlight=False)
