"""`soundlake recaption`: caption clips already in the lake with an audio LLM (+ refinement).

Runs only on the clips a SQL ``where`` selects, in Ray actor pools (``num_gpus`` per
model, batch size), and is resumable: clips that already have the final captioner's
caption from this model and prompt version (or a lint failure from it) are skipped.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import close, connect, where_expression
from soundlake.core.errors import UserError
from soundlake.core.ray_env import RaySpec, init_ray
from soundlake.pipelines.runner import RunSummary, consume, lake_clips_dataset, map_and_write, new_run_id, recorded_run
from soundlake.stages.recaption import QwenCaptionStage, RefineStage


@dataclass
class RecaptionArgs:
    model: str
    refine: str | None = None
    where: str | None = None
    prompt_version: str | None = None
    refine_prompt_version: str = "refine-v1"
    batch_size: int = 8
    num_gpus: float = 0.0
    concurrency: int = 1
    limit: int | None = None


def clips_to_caption(lake: Lake, args: RecaptionArgs) -> list[str]:
    """Clip ids matching ``where`` without this captioner's output (caption or lint failure)."""
    from soundlake.models.captioners.qwen import qwen_prompt_version

    if args.refine:
        captioner, model_id, version = "refine", args.refine, args.refine_prompt_version
    else:
        captioner, model_id, version = "qwen", args.model, qwen_prompt_version(args.model, args.prompt_version)
    con = connect(lake)
    try:
        rows = con.execute(f"""
            SELECT c.clip_id FROM clips c
            WHERE ({where_expression(args.where) if args.where else 'TRUE'})
              AND NOT EXISTS (SELECT 1 FROM captions k WHERE k.clip_id = c.clip_id AND k.captioner = $cap
                              AND k.model_id = $model AND k.prompt_version = $version)
              AND NOT EXISTS (SELECT 1 FROM failures f WHERE f.clip_id = c.clip_id AND f.stage = $cap)
            ORDER BY c.clip_id {f'LIMIT {int(args.limit)}' if args.limit else ''}""",
                           {"cap": captioner, "model": model_id, "version": version}).fetchall()
    except Exception as e:  # duckdb.Error: a bad --where
        raise UserError(f"SQL error in --where: {str(e).splitlines()[0]}") from None
    finally:
        close(con)
    return [r[0] for r in rows]


def recaption(lake_uri: str, args: RecaptionArgs, ray: RaySpec | None = None, wait: bool = False,
              on_progress=None) -> RunSummary:
    lake = Lake(lake_uri)
    run_id = new_run_id()
    summary = RunSummary(run_id=run_id, pipeline="recaption", lake=lake.uri)
    config = json.dumps(asdict(args))
    with lake.lock(run_id, wait=wait):
        lake.clean_tmp()
        need = clips_to_caption(lake, args)
        summary.inputs_total = len(need)
        with recorded_run(lake, "recaption", config, summary):
            t0 = time.perf_counter()
            if need:
                summary.ray_startup_s = init_ray(ray or RaySpec())
                t0 = time.perf_counter()
                kw = dict(batch_size=args.batch_size, num_gpus=args.num_gpus, concurrency=args.concurrency)
                stages = [QwenCaptionStage(args.model, run_id, prompt_version=args.prompt_version, **kw)]
                if args.refine:
                    stages.append(RefineStage(args.refine, run_id, prompt_version=args.refine_prompt_version, **kw))
                ds = lake_clips_dataset(lake, set(need), ["clip_id", "source", "source_id", "flac", "title",
                                                          "tags", "labels"])
                consume(map_and_write(ds, stages, lake.uri, run_id), summary, t0, on_progress, lake)
            summary.inputs_done = len(need)
            summary.elapsed_s = time.perf_counter() - t0
    return summary
