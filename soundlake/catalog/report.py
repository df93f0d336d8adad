"""`soundlake report thresholds`: how many caption pairs each CLAP threshold keeps.

Scores stay raw in the lake; this report helps a curator choose a threshold, shaped
like EzAudio's table (0.35 -> 0.58M, 0.40 -> 0.27M, 0.45 -> 0.11M pairs), per source
and captioner, with a histogram of the score distribution.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from soundlake.catalog.lake import Lake
from soundlake.catalog.sql import close, connect, execute_arrow
from soundlake.core.errors import UserError


@dataclass
class ThresholdReport:
    model: str
    thresholds: list[float]
    rows: list[dict]          # source, captioner, pairs, mean, p10, p50, p90, kept@t...
    scores: dict[tuple[str, str], list[float]]

    def markdown(self) -> str:
        head = ["source", "captioner", "pairs", "mean", "p10", "p50", "p90"] + [f"≥ {t:.2f}" for t in self.thresholds]
        lines = [f"CLAP model: `{self.model}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["source"], r["captioner"], str(r["pairs"])] + [f"{r[k]:.3f}" for k in ("mean", "p10", "p50", "p90")]
            cells += [f"{r['kept'][i]} ({100 * r['kept'][i] / max(1, r['pairs']):.0f}%)" for i in range(len(self.thresholds))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def histogram_png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for (source, captioner), values in sorted(self.scores.items()):
            ax.hist(values, bins=40, range=(-0.2, 1.0), alpha=0.5, label=f"{source} / {captioner}")
        for t in self.thresholds:
            ax.axvline(t, color="k", linestyle=":", linewidth=0.8)
        ax.set_xlabel("CLAP score (cosine)")
        ax.set_ylabel("caption pairs")
        ax.set_title(f"score distribution · {self.model}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    def html(self) -> str:
        import markdown_it  # rich ships markdown-it-py

        table = markdown_it.MarkdownIt().enable("table").render(self.markdown())
        img = base64.b64encode(self.histogram_png()).decode()
        return (f"<!doctype html><meta charset=utf-8><title>CLAP thresholds</title>"
                f"<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
                f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>"
                f"<h1>CLAP score thresholds</h1>{table}<img alt='{html.escape(self.model)} histogram' "
                f"src='data:image/png;base64,{img}'>")


def threshold_report(lake: Lake | str, thresholds: list[float], model: str | None = None) -> ThresholdReport:
    con = connect(lake)
    try:
        models = [m for (m,) in con.execute("SELECT DISTINCT clap_model_id FROM scores ORDER BY 1").fetchall()]
        if not models:
            raise UserError("no scores in the lake: curate with --set clap.model=PATH (stages embed, score) first")
        if model is None:
            if len(models) > 1:
                raise UserError(f"scores from {len(models)} CLAP models: choose one with --model ({', '.join(models)})")
            model = models[0]
        elif model not in models:
            raise UserError(f"no scores from --model {model!r}; the lake has: {', '.join(models)}")
        t = execute_arrow(con, """SELECT c.source, s.captioner, s.score FROM scores s JOIN clips c USING (clip_id)
                                  WHERE s.clap_model_id = ? ORDER BY 1, 2""", [model])
    finally:
        close(con)
    import numpy as np

    groups: dict[tuple[str, str], list[float]] = {}
    for source, captioner, score in zip(*(t[c].to_pylist() for c in t.column_names)):
        groups.setdefault((source, captioner), []).append(float(score))
    rows = []
    for (source, captioner), values in sorted(groups.items()):
        v = np.asarray(values)
        rows.append({"source": source, "captioner": captioner, "pairs": len(v), "mean": float(v.mean()),
                     "p10": float(np.quantile(v, 0.1)), "p50": float(np.quantile(v, 0.5)),
                     "p90": float(np.quantile(v, 0.9)), "kept": [int((v >= th).sum()) for th in thresholds]})
    return ThresholdReport(model=model, thresholds=thresholds, rows=rows, scores=groups)
