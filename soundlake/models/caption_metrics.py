"""Caption metrics against reference captions: BLEU-1/4, ROUGE-L, CIDEr-D, METEOR, embedding similarity.

The definitions follow the COCO caption evaluation code used by DCASE audio captioning
(lower-cased, punctuation stripped, whitespace tokens):

* BLEU-n: corpus BLEU, clipped n-gram precisions, geometric mean, brevity penalty with
  the closest reference length.
* ROUGE-L: per candidate, LCS precision and recall (max over references), F with β = 1.2;
  the mean over candidates.
* CIDEr-D: tf-idf n-gram vectors (n = 1..4, document frequency over the reference sets),
  clipped candidate counts, Gaussian length penalty (σ = 6), ×10, mean over references,
  n and candidates.
* Embedding similarity (FENSE-style, without its fluency detector): cosine of MiniLM
  sentence vectors, mean over references.
* METEOR 1.5: the COCO caption evaluation's own Java implementation (``meteor-1.5.jar``
  with its English paraphrase table, shipped in the ``pycocoevalcap`` package: the
  ``meteor`` extra), run on our tokenised text (COCO runs its Java PTB tokenizer first).
  Computed when Java and pycocoevalcap are there; otherwise the scores carry
  ``meteor_skipped`` with the reason (:func:`meteor_unavailable`).
* SPIDEr-style: (CIDEr-D + embedding similarity) / 2. Real SPIDEr averages CIDEr-D with
  SPICE, which needs Stanford CoreNLP models that cannot be had offline; the substitute is
  named for what it is (``spider_style``, never ``spider``).

Written here rather than taken from aac-metrics: that package pulls msclap, which pins
numpy < 2 and transformers < 5 and would downgrade the whole environment.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s']")


def tokenize(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(cands: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n."""
    match, total = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, rs in zip(cands, refs):
        c = tokenize(cand)
        rt = [tokenize(r) for r in rs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rt)[1]  # closest reference length
        for k in range(1, n + 1):
            cc = _ngrams(c, k)
            best: Counter = Counter()
            for r in rt:
                best |= _ngrams(r, k)
            match[k - 1] += sum(min(v, best[g]) for g, v in cc.items())
            total[k - 1] += max(0, len(c) - k + 1)
    if cand_len == 0 or min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / n
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return bp * math.exp(log_p)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(cands: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    scores = []
    for cand, rs in zip(cands, refs):
        c = tokenize(cand)
        lcs = [_lcs(c, tokenize(r)) for r in rs]
        p = max((l / len(c) if c else 0.0) for l in lcs)
        r = max((l / len(tokenize(ref)) if tokenize(ref) else 0.0) for l, ref in zip(lcs, rs))
        scores.append(((1 + beta ** 2) * p * r) / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def cider_d(cands: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    ref_counts = [[[_ngrams(tokenize(r), k) for k in range(1, n + 1)] for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in ref_counts:
        df.update({g for r in rs for counts in r for g in counts})
    log_n = math.log(max(1.0, float(len(refs))))

    def vec(counts: list[Counter]) -> tuple[list[dict], list[float], int]:
        vecs, norms = [], []
        for c in counts:
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, sum(counts[0].values())

    scores = []
    for cand, rs in zip(cands, ref_counts):
        cv, cn, cl = vec([_ngrams(tokenize(cand), k) for k in range(1, n + 1)])
        total = np.zeros(n)
        for r in rs:
            rv, rn, rl = vec(r)
            penalty = math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(x, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, x in cv[k].items())
                if cn[k] and rn[k]:
                    total[k] += dot / (cn[k] * rn[k]) * penalty
        scores.append(float(np.mean(total)) / max(1, len(rs)) * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def embedding_similarity(cands: Sequence[str], refs: Sequence[Sequence[str]], encoder=None) -> float:
    """Mean over candidates of the mean cosine with their references (MiniLM by default)."""
    if encoder is None:
        from soundlake.models.text import load_text_encoder

        encoder = load_text_encoder()
    flat = sorted({t for rs in refs for t in rs} | set(cands))
    emb = dict(zip(flat, encoder.encode(flat)))
    sims = [float(np.mean([emb[c] @ emb[r] for r in rs])) for c, rs in zip(cands, refs)]
    return float(np.mean(sims)) if sims else 0.0


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here (None: it can)."""
    import importlib.util
    import shutil

    if shutil.which("java") is None:
        return "no Java (install Debian's default-jre-headless)"
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install 'soundlake[meteor]')"
    return None


def meteor(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 of the COCO caption evaluation (its Java jar; see the module docstring):
    (corpus score, each candidate's score), from one Java process."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(tokenize(c))] for i, c in enumerate(cands)}
        score, each = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score), [float(x) for x in each]


def caption_scores(cands: Sequence[str], refs: Sequence[Sequence[str]], encoder=None,
                   with_meteor: bool = True) -> dict:
    """All metrics for candidates against their reference lists (METEOR when it can run)."""
    if len(cands) != len(refs) or any(not rs for rs in refs):
        raise ValueError("each candidate needs at least one reference")
    cider = cider_d(cands, refs)
    sim = embedding_similarity(cands, refs, encoder)
    out = {"bleu_1": bleu(cands, refs, 1), "bleu_4": bleu(cands, refs, 4), "rouge_l": rouge_l(cands, refs),
           "cider_d": cider, "sbert_sim": sim, "spider_style": (cider + sim) / 2, "n": len(cands)}
    why = meteor_unavailable() if with_meteor else "not asked for"
    if why is None:
        out["meteor"] = meteor(cands, refs)[0]
    else:
        out["meteor_skipped"] = why
    return out
