"""`train --eval-sets NAMES`: refuse shards whose export leaks into those evaluation sets.

The export's manifest (``eval_sets``, written by :mod:`soundlake.export.screening`) says, per
registered eval set, how many exported clips leak into it at each level, which levels were
checked and how many clips nobody checked. Latent shards (``soundlake encode``) are judged by
the audio export they were encoded from. ``--allow-leakage`` trains anyway; the problems found
are recorded in the model folder's metadata (``eval_sets``).
"""
from __future__ import annotations

from soundlake.core.errors import UserError
from soundlake.export.shards import read_manifest
from soundlake.generation.train.encode import FORMAT as LATENTS


def export_manifest(shards: str) -> tuple[str, dict | None]:
    """(export folder, its manifest) behind ``shards`` (an export, or latents encoded from one)."""
    manifest = read_manifest(shards)
    if manifest is not None and manifest.get("format") == LATENTS:
        return manifest["source"], read_manifest(manifest["source"])
    return shards, manifest


def leakage_problems(manifest: dict | None, names: list[str]) -> list[str]:
    """One short phrase per eval set that the export leaks into or did not check."""
    sets = ((manifest or {}).get("eval_sets") or {}).get("sets")
    if sets is None:
        return [f"{n}: not checked (the export has no leakage record)" for n in names]
    problems = []
    for n in names:
        s = sets.get(n)
        if s is None:
            problems.append(f"{n}: not checked (not registered in the lake at export time)")
            continue
        leaking = ", ".join(f"{lv} {k}" for lv, k in s.get("leaking", {}).items() if k)
        if leaking:
            problems.append(f"{n}: clips leak ({leaking})")
        if s.get("unchecked_levels"):
            problems.append(f"{n}: level {', '.join(s['unchecked_levels'])} not checked")
        if s.get("unchecked_clips"):
            problems.append(f"{n}: {s['unchecked_clips']} clips not checked")
    return problems


def check_eval_sets(shards: str, names: list[str], allow: bool) -> dict:
    """Raise a one-line UserError when ``shards`` leak into ``names`` (unless ``allow``);
    returns the record for the model folder's metadata."""
    export, manifest = export_manifest(shards)
    problems = leakage_problems(manifest, names)
    if problems and not allow:
        raise UserError(f"--eval-sets: the export {export} fails the leakage check (" + "; ".join(problems)
                        + f"); export again with --exclude-eval-sets {','.join(names)} (after `soundlake dedup` if "
                        "clips were not checked), or pass --allow-leakage to train anyway (recorded in the model folder)")
    return {"export": export, "eval_sets": names, "problems": problems, "allow_leakage": allow,
            "export_id": (manifest or {}).get("export_id")}
