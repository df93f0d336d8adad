"""Duplicate finding at scale: 1,000,000 embeddings and 100,000 fingerprints.

* Semantic level: ``semantic_pairs`` (faiss) over N synthetic 512-d embeddings, streamed in
  blocks of 65,536 rows from a seeded generator (never all in memory but for the index).
  They are clustered: members of 4,096 clusters whose spreads give member-to-member cosines
  from ~0.5 up to ~0.96 (a few tight clusters hold every pair of their members above 0.95,
  like silence or hum clips in CLAP space), plus 5% planted copies of earlier rows with small
  noise (cosine 0.96-0.999 to their source). Then a second pass over the same blocks runs
  exact search (one matrix product per block) for 1,000 sampled queries. Prints time, peak
  memory, the recall of the planted pairs and of exact search for those queries, and the
  precision (reported pairs confirmed by the exact search, and reported pairs touching a
  planted copy whose cosine, recomputed in float64, is above the threshold).
* Fingerprint level: a ``FingerprintIndex`` over M random Chromaprint-like fingerprints
  (uint32 items, 100-250 of them) of which 10% are planted copies (a trimmed start and end,
  up to 10% of the bits flipped): time, peak memory, recall of the planted pairs and
  precision (reported pairs inside one planted family). Random items never match by chance
  (1 - bit error rate ~0.5), so the planted pairs are the whole truth there. Then real
  fingerprints of synth clips (half sequences, half single events in a quiet floor): the
  lowest similarity, envelope agreement and detail agreement (contour correlation, pitch
  difference: :mod:`soundlake.dedup.detail`) of altered copies (MP3 128k, resampled, -6 dB,
  trimmed 1 s, 30 dB SNR noise), and how many pairs of different clips sharing a class reach
  ``FP_THRESHOLD`` by bits alone, also ``ENV_THRESHOLD``, and also the detail check; of those
  left, how many are renderings of one waveform (the synth's hum is one fixed waveform per
  mains frequency: normalised cross-correlation of the two clips >= 0.95), which a content
  fingerprint should group.

Peak memory is the process's peak resident set during each part (Linux: reset through
/proc/self/clear_refs). The machine is shared: times are wall-clock and CPU seconds.
Run: ``python benchmarks/dedup.py [--vectors 1000000 --fingerprints 100000 --real-seed 5 --real-rate 44100]``
(``--quick``: 20,000 128-d vectors, 3,000 fingerprints, 4 real clips).
"""
from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from common import figure, parse_args

from soundlake.dedup.detail import CONTOUR_THRESHOLD, PITCH_CENTS, detail_agreement
from soundlake.dedup.fingerprint import (
    ENV_THRESHOLD,
    FINGERPRINTER,
    FP_THRESHOLD,
    ITEM_HOP,
    FingerprintIndex,
    clip_features,
    envelope_agreement,
    similarity,
)
from soundlake.dedup.neighbors import semantic_pairs
from soundlake.sources.synth import plan_scene, synth_clip

FIGURES = ("semantic_time", "semantic_recall_planted", "semantic_recall_exact", "semantic_precision",
           "fingerprint_time", "fingerprint_recall_planted", "fingerprint_precision", "fingerprint_real_margin",
           "fingerprint_near_twins")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does
BLOCK = 65536


class Meter:
    """Wall and CPU seconds and the peak resident set of one part."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")   # peak RSS := current RSS
        except OSError:
            pass
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu
        self.peak_gib = _peak_rss_gib()

    def __str__(self):
        return f"{self.wall:.1f} s wall ({self.cpu:.1f} s CPU), peak RSS {self.peak_gib:.2f} GiB"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- semantic level --------------------------------------------------------------------------
class Embeddings:
    """Clustered unit-ish vectors, block by block, the same on every pass (seeded per block)."""

    def __init__(self, n: int, dim: int, clusters: int, seed: int = 0, planted: float = 0.05):
        self.n, self.dim, self.seed, self.planted = n, dim, seed, planted
        rng = np.random.default_rng([seed, 0])
        c = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        # member-to-member cosine ~ 1 / (1 + spread^2): 0.5 at spread 1, 0.955 at 0.22
        self.spread = rng.uniform(0.22, 1.0, clusters).astype(np.float32)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, planted source positions, planted copy positions) of block ``b``."""
        start = b * BLOCK
        m = min(BLOCK, self.n - start)
        rng = np.random.default_rng([self.seed, 1, b])
        k = rng.integers(0, len(self.centres), m)
        x = rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= (self.spread[k] / np.sqrt(self.dim))[:, None]
        x += self.centres[k]
        copies = int(m * self.planted)
        src, dst = rng.integers(0, m - copies, copies), np.arange(m - copies, m)
        noise = rng.standard_normal((copies, self.dim), dtype=np.float32)
        noise *= (rng.uniform(0.045, 0.29, copies).astype(np.float32) / np.linalg.norm(noise, axis=1))[:, None]
        x[dst] = x[src] / np.linalg.norm(x[src], axis=1, keepdims=True) + noise   # cosine 0.96-0.999
        return x, start + src, start + dst

    def blocks(self) -> int:
        return -(-self.n // BLOCK)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def semantic(a: argparse.Namespace) -> None:
    emb = Embeddings(a.vectors, a.dim, a.clusters)
    rng = np.random.default_rng(1)
    queries = np.sort(rng.choice(a.vectors, a.queries, replace=False))
    planted_src, planted_dst, q_rows = [], [], {}
    gen_s = 0.0

    def stream():
        nonlocal gen_s
        for b in range(emb.blocks()):
            t = time.perf_counter()
            x, src, dst = emb.block(b)
            gen_s += time.perf_counter() - t
            planted_src.append(src)
            planted_dst.append(dst)
            inside = queries[(queries >= b * BLOCK) & (queries < b * BLOCK + len(x))]
            q_rows.update(zip(inside.tolist(), x[inside - b * BLOCK]))
            yield x

    ids = [f"e{i:07d}" for i in range(a.vectors)]
    with Meter() as m:
        found = np.array([(int(p[1:]), int(q[1:])) for p, q, _ in semantic_pairs(ids, stream(), a.threshold)],
                         np.int64).reshape(-1, 2)
    n = a.vectors
    code = found[:, 0] * n + found[:, 1]               # ids sort as positions: a < b means lo < hi
    figure("semantic_time", f"{n:,} x {a.dim}-d, cosine >= {a.threshold}: {m} "
                            f"({gen_s:.1f} s of it generating the vectors); {len(code):,} pairs")
    src, dst = np.concatenate(planted_src), np.concatenate(planted_dst)
    planted = np.unique(np.minimum(src, dst) * n + np.maximum(src, dst))
    recall_planted = np.isin(planted, code).mean()
    figure("semantic_recall_planted", f"{recall_planted:.4f} of {len(planted):,} planted pairs (target >= 0.99)")

    # exact search for the sampled queries, and float64 cosines of reported pairs touching a copy
    qi = np.array(sorted(q_rows))
    qx = _unit(np.stack([q_rows[i] for i in qi]).astype(np.float32))
    copy_pairs = found[np.isin(found, dst).any(axis=1)]
    check = copy_pairs[rng.choice(len(copy_pairs), min(len(copy_pairs), 20_000), replace=False)]
    need, rows = set(check.ravel().tolist()), {}
    exact = []
    t = time.perf_counter()
    for b in range(emb.blocks()):
        x = emb.block(b)[0]
        pos = np.arange(b * BLOCK, b * BLOCK + len(x))
        s = qx @ _unit(x).T
        r, c = np.nonzero(s >= a.threshold)
        keep = qi[r] != pos[c]
        exact.append(np.stack([qi[r][keep], pos[c][keep]], axis=1))
        rows.update((p, x[p - b * BLOCK].astype(np.float64)) for p in need if b * BLOCK <= p < b * BLOCK + len(x))
    exact = np.concatenate(exact)
    exact_code = np.minimum(exact[:, 0], exact[:, 1]) * n + np.maximum(exact[:, 0], exact[:, 1])
    reported = code[np.isin(found, qi).any(axis=1)]    # reported pairs with a sampled query in them
    recall_exact = np.isin(exact_code, code).mean() if len(exact_code) else float("nan")
    figure("semantic_recall_exact", f"{recall_exact:.4f} of {len(np.unique(exact_code)):,} pairs that exact search "
                                    f"finds for {len(qi):,} sampled queries (target >= 0.99; exact search "
                                    f"{time.perf_counter() - t:.0f} s)")
    confirmed = np.isin(reported, exact_code).mean() if len(reported) else float("nan")
    cos = [float(rows[p] @ rows[q] / np.linalg.norm(rows[p]) / np.linalg.norm(rows[q])) for p, q in check]
    above = np.mean(np.array(cos) >= a.threshold - 1e-6) if cos else float("nan")
    figure("semantic_precision", f"{above:.4f} of {len(check):,} reported pairs touching a planted copy have "
                                 f"cosine >= {a.threshold} in float64; {confirmed:.4f} of {len(reported):,} "
                                 "reported pairs of the sampled queries are in the exact answer (target >= 0.99)")


# ---- fingerprint level ---------------------------------------------------------------------
def random_fingerprints(total: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """Fingerprints and their family (the original's number); the last 10% are copies."""
    copies = total // 10
    fps = [rng.integers(0, 2**32, rng.integers(100, 251), dtype=np.uint32) for _ in range(total - copies)]
    family = list(range(total - copies))
    bits = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for src in rng.integers(0, total - copies, copies).tolist():
        x = fps[src][rng.integers(0, 20):]
        x = x[: x.size - int(rng.integers(0, 10))]
        flips = rng.random((x.size, 32)) < rng.uniform(0.0, 0.10)
        fps.append(x ^ np.bitwise_or.reduce(np.where(flips, bits, np.uint32(0)), axis=1))
        family.append(src)
    return fps, family


def fingerprints(a: argparse.Namespace) -> None:
    fps, family = random_fingerprints(a.fingerprints, np.random.default_rng(2))
    with Meter() as m:
        index = FingerprintIndex()
        for i, fp in enumerate(fps):
            index.add(f"f{i:07d}", fp)
        found = [(int(p[1:]), int(q[1:])) for p, q, _ in index.pairs(FP_THRESHOLD)]
    lengths = [fp.size for fp in fps]
    figure("fingerprint_time", f"{len(fps):,} fingerprints ({min(lengths)}-{max(lengths)} items), "
                               f"similarity >= {FP_THRESHOLD}: {m}; {len(found):,} pairs")
    n = len(fps)
    planted = {(min(src, i), max(src, i)) for i, src in enumerate(family) if src != i}
    got = set(found)
    figure("fingerprint_recall_planted", f"{len(planted & got) / len(planted):.4f} of {len(planted):,} planted "
                                         "pairs (original, copy) (target >= 0.99)")
    inside = sum(family[p] == family[q] for p, q in found)
    figure("fingerprint_precision", f"{inside / max(1, len(found)):.4f} of {len(found):,} reported pairs are in one "
                                    f"planted family (target >= 0.99; {n:,} fingerprints)")


def _noisy(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``audio`` with white noise at 30 dB SNR."""
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    return audio + rng.standard_normal(audio.size).astype(np.float32) * np.float32(rms * 10 ** -1.5)


def _altered(audio: np.ndarray, sr: int, rng: np.random.Generator, tmp: Path) -> dict[str, np.ndarray]:
    noise = _noisy(audio, rng)
    sf.write(str(tmp / "in.wav"), audio, sr)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(tmp / "in.wav"), "-b:a", "128k",
                    str(tmp / "out.mp3")], check=True, timeout=120)
    return {"mp3": sf.read(str(tmp / "out.mp3"), dtype="float32")[0],
            "resampled": soxr.resample(soxr.resample(audio, sr, sr // 2), sr // 2, sr),
            "-6dB": audio * np.float32(0.5), "trimmed": audio[sr:], "noise": noise}


def _one_waveform(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two clips are one waveform at some lag (normalised cross-correlation >= 0.95)."""
    n = x.size + y.size
    xc = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(y, n)), n)
    return float(np.abs(xc).max() / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12)) >= 0.95


def real_margin(a: argparse.Namespace) -> None:
    """Real fingerprints through the index as the fingerprint level runs it: originals, altered
    copies of some, and a faintly noisy copy of every single-event scene (the weak case)."""
    seed, sr, rng = a.real_seed, a.real_rate, np.random.default_rng(3)
    indices = [i for i in range(10 * a.real_clips + 50) if plan_scene(seed, i).kind == "sequence"][: a.real_clips // 2]
    indices += [i for i in range(10 * a.real_clips + 50) if plan_scene(seed, i).kind == "single"][: a.real_clips // 2]
    index, labels, lowest, copies = FingerprintIndex(), {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, i in enumerate(indices):
            scene, audio = synth_clip(seed, i, 10.0, sr)
            fp, env, fine = clip_features(audio, sr)
            index.add(f"{i}", fp, env, fine)
            labels[f"{i}"] = set(scene.labels)
            variants = _altered(audio, sr, rng, Path(tmp)) if n % (len(indices) // a.real_altered or 1) == 0 else {}
            if scene.kind == "single" and "noise" not in variants:
                variants["noise"] = _noisy(audio, rng)
            for name, x in variants.items():
                fp2, env2, fine2 = clip_features(x, sr)
                index.add(f"{i}/{name}", fp2, env2, fine2)
                copies.setdefault(name, set()).add(f"{i}")
                s, offset = similarity(fp, fp2)
                r, cents = detail_agreement(fine, fine2, offset * ITEM_HOP, ITEM_HOP)
                low = lowest.get(name, (1.0, 1.0, 1.0, 0.0))
                lowest[name] = (min(low[0], s), min(low[1], envelope_agreement(env, env2, offset)), min(low[2], r),
                                max(low[3], cents or 0.0))
    found, false, twins, one_waveform = {}, [], [], {}
    t0 = time.perf_counter()
    reported = list(index.pairs())
    pairs_s = time.perf_counter() - t0
    for p, q, _ in reported:
        fam_p, fam_q = p.split("/")[0], q.split("/")[0]
        if fam_p == fam_q:
            if p == fam_p or q == fam_q:                   # an original and one of its copies
                found.setdefault((q if p == fam_p else p).split("/")[1], set()).add(fam_p)
            continue
        key = tuple(sorted((fam_p, fam_q)))
        if key not in one_waveform:
            one_waveform[key] = _one_waveform(*(synth_clip(seed, int(k), 10.0, 11025)[1] for k in key))
        (twins if one_waveform[key] else false).append((p, q))
    figure("fingerprint_real_margin", f"{FINGERPRINTER} on {len(indices)} 10 s synth scenes of seed {seed} at {sr} Hz "
                                      "(half single events): "
                                      "altered copies (bits, envelope, contour, pitch cents) >= "
           + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}/{v[2]:.3f}/<={v[3]:.0f}" for k, v in lowest.items())
           + f" (thresholds {FP_THRESHOLD}/{ENV_THRESHOLD}/{CONTOUR_THRESHOLD}/<={PITCH_CENTS:.0f}); found by the "
             "index: " + ", ".join(f"{k} {len(found.get(k, ()))}/{len(v)}" for k, v in copies.items())
           + f"; index.pairs() over {len(index)} fingerprints with detail: {pairs_s:.1f} s, {len(reported)} pairs")
    same_class = sum(bool(labels[p] & labels[q]) for p, q in itertools.combinations(labels, 2))
    originals = sum("/" not in p + q for p, q in false)
    figure("fingerprint_near_twins", f"pairs of different scenes the index reports: {len(false)} that are not one "
                                     f"waveform ({originals} of them between two originals, of {same_class:,} "
                                     f"same-class pairs of originals; the rest an original or copy with another's "
                                     f"copy), plus {len(twins)} that are renderings of one waveform (cross-correlation "
                                     f">= 0.95: the synth hum), which a content fingerprint should group; "
                                     f"the first: {false[:5]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--fingerprints", type=int, default=100_000)
    ap.add_argument("--real-clips", type=int, default=300)
    ap.add_argument("--real-altered", type=int, default=60, help="clips (of --real-clips) given altered copies")
    ap.add_argument("--real-seed", type=int, default=5, help="synth seed of the real clips (the demo's is 0)")
    ap.add_argument("--real-rate", type=int, default=44100, help="sample rate of the real clips (the demo's is 16000)")
    a = parse_args(ap, dict(vectors=20_000, dim=128, clusters=256, queries=200, fingerprints=3000, real_clips=4,
                            real_altered=2))
    fingerprints(a)
    real_margin(a)
    semantic(a)


if __name__ == "__main__":
    main()
