"""`soundlake dedup` and `soundlake eval-sets add|list`: duplicates and evaluation-set leakage."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from soundlake.cli.main import CATALOG, CURATE, LAKE, VERBOSE, app, as_user_error, console, eval_sets_app, stdout
from soundlake.core.storage import user_storage_errors


@app.command(rich_help_panel=CURATE)
def dedup(
    lake: str = LAKE,
    levels: Optional[str] = typer.Option(None, help="Levels to run, e.g. identity,fingerprint: identity (same "
                                         "Freesound id or YouTube video and time range), fingerprint (Chromaprint), "
                                         "semantic (CLAP cosine). Default: all, semantic when the lake has embeddings."),
    semantic_threshold: float = typer.Option(0.95, help="Semantic level: CLAP embedding cosine at or above this."),
    clap_model: Optional[str] = typer.Option(None, help="Semantic level: the CLAP model id of the embeddings "
                                             "(default: the newest)."),
    num_cpus: Optional[int] = typer.Option(None, help="Local Ray: CPUs to use."),
    address: Optional[str] = typer.Option(None, help="Join a running Ray cluster."),
    wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
    verbose: bool = VERBOSE,
):
    """Find duplicate clips at each level, and the clips leaking into registered eval sets.

    Fingerprints clips that have none (on Ray; resumable), then replaces the duplicates,
    duplicate_groups and leakage tables with this run's results in one atomic step (levels not run
    keep their rows). Prints groups and clips per level."""
    from soundlake.core.ray_env import RaySpec
    from soundlake.pipelines.dedup import DedupArgs, parse_levels, run_dedup

    args = DedupArgs(levels=parse_levels(levels) if levels else None, semantic_threshold=semantic_threshold, clap_model=clap_model)
    with user_storage_errors(f"lake {lake}"), as_user_error(ValueError):
        s = run_dedup(lake, args, RaySpec(num_cpus=num_cpus, address=address), wait=wait)
    t = Table(title=f"dedup {s.run_id} · {s.clips} clips", title_justify="left")
    for col in ("level", "method", "pairs", "groups", "clips in groups", "removable"):
        t.add_column(col, no_wrap=col == "level", overflow="ellipsis", max_width=None if col == "level" else 24)
    for level, r in s.levels.items():
        rows = [(level, r)] if level != "semantic" else [(f"semantic ≥ {c}", x) for c, x in s.semantic_at.items()]
        for name, x in rows:
            t.add_row(name, str(r.get("method", "")), str(x["pairs"]), str(x["groups"]), str(x["clips"]),
                      str(x["removable"]))
    console.print(t)
    if "fingerprint" in s.levels:
        console.print(f"fingerprints: {s.fingerprinted} new, {s.fingerprint_failures} failed"
                      + (f" (+ {s.ray_startup_s:.1f} s Ray start-up)" if s.ray_startup_s else ""), highlight=False)
    for name, by in sorted(s.leakage.items()):
        console.print(f"leakage into {name}: " + ", ".join(f"{lv} {n} clips" for lv, n in by.items()), highlight=False)
    for note in s.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"{s.elapsed_s:.1f} s · next: soundlake sql \"SELECT * FROM duplicate_groups ORDER BY size DESC "
                  f"LIMIT 20\" --lake {lake}", highlight=False, markup=False)


@eval_sets_app.command("add")
def eval_sets_add(
    name: str = typer.Argument(..., help="A name for the set, e.g. audiocaps-test."),
    csv: Path = typer.Option(..., "--csv", help="The set's official file: AudioCaps test.csv, Clotho captions or "
                             "metadata CSV, ESC-50 meta/esc50.csv, vggsound.csv, or an id list."),
    format: Optional[str] = typer.Option(None, "--format", help="audiocaps | clotho | esc50 | vggsound | ids "
                                         "(default: from the header)."),
    metadata: Optional[Path] = typer.Option(None, help="Clotho: the metadata CSV with the Freesound ids (default: "
                                            "clotho_metadata_<split>.csv beside --csv)."),
    audio: Optional[Path] = typer.Option(None, help="The set's audio folder: fingerprint and embed each item, for "
                                         "content leakage."),
    clap_model: Optional[str] = typer.Option(None, help="With --audio: the CLAP model to embed with (default: the "
                                             "model of the lake's newest embeddings)."),
    lake: str = LAKE,
    wait: bool = typer.Option(False, help="Wait for another job writing the lake instead of refusing."),
    catalog: str | None = CATALOG,   # read through SOUNDLAKE_CATALOG
):
    """Register an evaluation set (replacing one of the same name) and recompute the lake's leakage into the sets.

    Writes eval_sets and eval_set_items, and the leakage table, in one atomic step."""
    from soundlake.pipelines.eval_sets import add_eval_set

    with user_storage_errors(f"lake {lake}"):
        r = add_eval_set(lake, name, str(csv), format, str(metadata) if metadata else None,
                         str(audio) if audio else None, clap_model, wait=wait)
    console.print(f"eval set [bold]{r.name}[/] ({r.format}): {r.items} items"
                  + (f" · {r.fingerprinted} fingerprinted, {r.embedded} embedded" if audio else ""), highlight=False)
    if r.missing_audio or r.undecodable:
        console.print(f"[yellow]audio[/]: {len(r.missing_audio)} items without a file in {audio}"
                      + (f" (e.g. {r.missing_audio[0]})" if r.missing_audio else "")
                      + f", {len(r.undecodable)} undecodable", highlight=False)
    for set_name, by in sorted(r.leakage.items()):
        console.print(f"leakage into {set_name}: " + ", ".join(f"{lv} {n} clips" for lv, n in by.items()),
                      highlight=False)
    console.print(f"leakage checked at levels {', '.join(r.levels)}"
                  + ("" if "fingerprint" in r.levels else " (run `soundlake dedup` for the content levels)"),
                  highlight=False, markup=False)


@eval_sets_app.command("list")
def eval_sets_list(lake: str = LAKE):
    """The registered evaluation sets, as a table on stdout."""
    from soundlake.pipelines.eval_sets import list_eval_sets

    t = Table(title="eval sets", title_justify="left")
    cols = ["name", "format", "items", "fingerprinted", "embedded", "created"]
    for c in cols:
        t.add_column(c, no_wrap=c == "name")
    for row in list_eval_sets(lake):
        t.add_row(*[str(row[c]) if c != "created" else f"{row[c]:%Y-%m-%d %H:%M}" for c in cols])
    stdout.print(t)
