"""Generation metrics: Fréchet distance, KL divergence, Inception Score, CLAP score.

The numeric cores take arrays; the ``*_audio`` wrappers take clips plus the model as a
callable, so any embedder or classifier plugs in: the in-house / HF / laion CLAP
(``soundlake.models.clap.load.load_clap(path).embed_audio``), a PANNs or VGGish wrapper, or a
zero-shot CLAP classifier (``zero_shot(clap.embed_audio(c), clap.embed_text(labels),
clap.logit_scale)``). Every wrapper returns a :class:`MetricResult` recording the sample
rate and clip counts (and whatever the caller passes as ``model`` identity), so numbers
from two setups are never mixed silently.

Public API::

    frechet_distance(emb_a [N, D], emb_b [M, D], eps=1e-6) -> float
    frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float
    kl_divergence(ref_probs [N, C], gen_probs [N, C], eps=1e-6) -> np.ndarray [N]  # per pair
    inception_score(probs [N, C], splits=10) -> (mean, std)
    clap_score(audio_emb [N, D], text_emb [N, D]) -> float          # mean paired cosine
    softmax(logits, axis=-1) -> np.ndarray

    fd_audio(generated, reference, embed, sample_rate, model="") -> MetricResult
    kl_audio(generated, reference, classify, sample_rate, eps=1e-6, model="") -> MetricResult
    is_audio(generated, classify, sample_rate, splits=10, model="") -> MetricResult
    clap_score_audio(generated, texts, embed_audio, embed_text, sample_rate, model="")
    @dataclass MetricResult(name, value, sample_rate, n_generated, n_reference, std=None,
                            model="", details={}) .to_dict()
    ClapFunctions.of(clap, labels=None) -> ClapFunctions   # from any ClapBackend:
        .embed_audio, .embed_text, .classify (zero-shot softmax over labels),
        .sample_rate, .model (its checkpoint identity, for MetricResult.model)

Conventions:

* FD follows the reference implementations' formula
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``, covariances with ``ddof=1``;
  when ``sqrtm`` is not finite, ``eps * I`` is added to both covariances; a complex result
  is accepted (real part kept) only if its diagonal's imaginary part is below 1e-3.
* KL direction: ``KL(reference || generated) = sum_c p_ref log(p_ref / p_gen)`` per pair
  (as AudioLDM's evaluation computes ``kl_div(log p_gen, p_ref)``), averaged over pairs.
  Both distributions are smoothed ``(p + eps) / (1 + C * eps)`` so it is finite, >= 0 and
  exactly 0 for identical inputs (AudioLDM adds eps to the generated side only; the two
  differ by O(C * eps)). Inputs are probabilities (apply :func:`softmax` to logits).
* IS: ``exp(E_x KL(p(y|x) || p(y)))`` per split (``np.array_split``), mean and std over
  splits; 0 log 0 = 0.
* CLAP score: mean cosine between each generated clip's audio embedding and its own text
  (not x100).
* Clips are mono float arrays at ``sample_rate``; the wrappers do not resample: pass an
  embedder for that rate (CLAP backends expose ``sample_rate``; resample before with soxr).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import scipy.linalg
from scipy.special import xlogy

Clips = Sequence[np.ndarray]


@dataclass
class MetricResult:
    name: str
    value: float
    sample_rate: int
    n_generated: int
    n_reference: int = 0
    std: float | None = None
    model: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- cores


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                                sigma2: np.ndarray, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("mean / covariance shapes differ")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # singular product: regularise both covariances, as the reference implementations do
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component "
                             f"({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(emb, np.float64)
    if emb.ndim != 2 or len(emb) < 2:
        raise ValueError("need an [N >= 2, D] embedding array")
    return emb.mean(0), np.cov(emb, rowvar=False)


def frechet_distance(emb_a: np.ndarray, emb_b: np.ndarray, eps: float = 1e-6) -> float:
    return frechet_distance_from_stats(*_stats(emb_a), *_stats(emb_b), eps=eps)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _check_probs(p: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be [N, C]")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{name} rows must be probability distributions (softmax logits first)")
    return p


def kl_divergence(ref_probs: np.ndarray, gen_probs: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-pair KL(reference || generated) (see module docstring)."""
    p, q = _check_probs(ref_probs, "ref_probs"), _check_probs(gen_probs, "gen_probs")
    if p.shape != q.shape:
        raise ValueError(f"paired inputs differ in shape: {p.shape} vs {q.shape}")
    c = p.shape[1]
    p, q = (p + eps) / (1 + c * eps), (q + eps) / (1 + c * eps)
    return (xlogy(p, p) - xlogy(p, q)).sum(1)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    p = _check_probs(probs, "probs")
    if not 1 <= splits <= len(p):
        raise ValueError(f"splits must be in [1, {len(p)}]")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, py)).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def clap_score(audio_emb: np.ndarray, text_emb: np.ndarray) -> float:
    a, t = np.asarray(audio_emb, np.float64), np.asarray(text_emb, np.float64)
    if a.shape != t.shape:
        raise ValueError(f"paired embeddings differ in shape: {a.shape} vs {t.shape}")
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    t = t / np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)
    return float((a * t).sum(1).mean())


# --------------------------------------------------------------------------- wrappers


@dataclass
class ClapFunctions:
    """The callables the wrappers take, made from a CLAP backend (``load_clap(path)``):
    audio embeddings for FD, zero-shot class probabilities over ``labels`` for KL / IS,
    and the text tower for the CLAP score."""

    embed_audio: Callable[[list], np.ndarray]
    embed_text: Callable[[list], np.ndarray]
    classify: Callable[[list], np.ndarray] | None
    sample_rate: int
    model: str

    @classmethod
    def of(cls, clap, labels: Sequence[str] | None = None,
           template: str = "the sound of {label}") -> "ClapFunctions":
        from soundlake.models.clap.windowing import label_prompts, zero_shot

        classify = None
        if labels:
            label_emb = clap.embed_text(label_prompts(list(labels), template))

            def classify(clips: list) -> np.ndarray:
                return zero_shot(clap.embed_audio(clips), label_emb, clap.logit_scale)
        ident = getattr(clap, "identity", {}) or {}
        model = f"{ident.get('backend', '?')}:{ident.get('model', '?')}@{str(ident.get('checkpoint_sha256', ''))[:12]}"
        return cls(clap.embed_audio, clap.embed_text, classify, int(clap.sample_rate), model)



def fd_audio(generated: Clips, reference: Clips, embed: Callable[[list], np.ndarray],
             sample_rate: int, eps: float = 1e-6, model: str = "") -> MetricResult:
    """Fréchet distance between embeddings of generated and reference clips."""
    ea, eb = np.asarray(embed(list(generated))), np.asarray(embed(list(reference)))
    return MetricResult("fd", frechet_distance(ea, eb, eps), sample_rate, len(ea), len(eb),
                        model=model, details={"dim": int(ea.shape[1]), "eps": eps})


def kl_audio(generated: Clips, reference: Clips, classify: Callable[[list], np.ndarray],
             sample_rate: int, eps: float = 1e-6, model: str = "") -> MetricResult:
    """Mean KL(reference || generated) of class probabilities over paired clips."""
    if len(generated) != len(reference):
        raise ValueError("KL needs paired clips (same count, same order)")
    kl = kl_divergence(classify(list(reference)), classify(list(generated)), eps)
    return MetricResult("kl", float(kl.mean()), sample_rate, len(generated), len(reference),
                        std=float(kl.std()), model=model,
                        details={"direction": "KL(reference||generated)", "eps": eps})


def is_audio(generated: Clips, classify: Callable[[list], np.ndarray], sample_rate: int,
             splits: int = 10, model: str = "") -> MetricResult:
    mean, std = inception_score(classify(list(generated)), splits)
    return MetricResult("is", mean, sample_rate, len(generated), 0, std=std, model=model,
                        details={"splits": splits})


def clap_score_audio(generated: Clips, texts: Sequence[str], embed_audio: Callable[[list], np.ndarray],
                     embed_text: Callable[[list], np.ndarray], sample_rate: int,
                     model: str = "") -> MetricResult:
    if len(generated) != len(texts):
        raise ValueError("one text per generated clip")
    score = clap_score(embed_audio(list(generated)), embed_text(list(texts)))
    return MetricResult("clap_score", score, sample_rate, len(generated), 0, model=model)
