"""Content fingerprints: Chromaprint raw fingerprints, their comparison and an index.

``fingerprint(audio, sr)`` calls libchromaprint in-process through ctypes: about 20 ms for a
10 s clip, against about 150 ms for Debian's ``fpcalc -raw`` (a process start plus a WAV
written and decoded again for every clip), and no extra Python package (pyacoustid's
``chromaprint`` module is the same ctypes binding). The library comes with Debian's
``libchromaprint-tools`` (``libchromaprint1``, which ffmpeg's packages also pull in). Audio
is resampled to Chromaprint's 11025 Hz with soxr first, as fpcalc resamples with ffmpeg
(feeding 44.1 kHz to Chromaprint's own resampler is ~40% slower).

A raw fingerprint is one 32-bit item per ~0.124 s (8.08 items/s); each item summarises
about 2 s of chroma, and the first ~2.6 s of a clip yield none (a 10 s clip gives ~59
items; under ~3 s, none). ``similarity`` aligns two fingerprints as AcoustID does: at every
offset it counts the differing bits (popcount of XOR) over the overlap, and the best offset
gives ``1 - bit error rate``. Only offsets whose overlap covers ``min_coverage`` of the
shorter fingerprint count, so a clip matches a trimmed copy or an excerpt of itself, but not
another clip that shares one 2 s sound (the same synthetic hum at another time).

Calibration of ``FP_THRESHOLD`` on 10 s synth clips of 2-3 events in sequence
(``benchmarks/dedup.py`` prints a smaller run): copies re-encoded as MP3 128k score >= 0.969
(150 clips), resampled 44.1k->22.05k->44.1k >= 0.999, at -6 dB >= 0.995, trimmed by 1 s
>= 0.935, mixed with white noise at 30 dB SNR >= 0.874 (350 clips; the hardest, 1 of them
under 0.88). Over the 42,740 pairs of 400 different clips that share a class, the 99th
percentile is 0.80 and 8 pairs reach 0.87-0.90: scenes with the same events in the same order
at nearly the same times (a ~2.2 kHz beep, then a 60 Hz hum), which a chroma fingerprint
cannot tell apart. Unrelated audio scores ~0.5-0.8: Chromaprint's bits are biased, so two
noise floors already agree on ~75% of them. The weak case is a clip that is mostly a quiet
noise floor (one short event in 10 s): added noise rewrites the floor's items, so such a
copy can fall below the threshold, and two single steady hums in noise can score 0.88-0.91.

The envelope check. A chroma fingerprint of a clip that is mostly a quiet floor is mostly the
floor's items, so two renderings of one synthetic template (the same 2.2 kHz beep, the same
50 Hz hum, at other times and lengths) agree on 87-92% of the bits, as much as a copy with
added noise does. ``features`` therefore also keeps a loudness envelope (:func:`envelope`,
three frames per item, ~240 bytes for 10 s), and a match needs the envelopes to agree too:
their Pearson correlation at the fingerprints' offset (``envelope_agreement``, the best within
one item of it) must reach ``ENV_THRESHOLD``. Calibration on 500 10 s synth clips of every
kind, 250 of them given each of the five alterations (``benchmarks/dedup.py`` prints a smaller
run): copies re-encoded, resampled or at -6 dB keep 1.000, trimmed by 1 s >= 0.949, with
30 dB SNR noise >= 0.990; of the 33,990
pairs of different clips sharing a class, 72 reach FP_THRESHOLD and 41 of them also reach
0.93, so the check removes 43% of those false pairs and no copy. What is left are near-twins:
one template at nearly the same parameters and length (a 50 Hz hum of 2.19 s and one of
2.09 s, bells at 630 and 636 Hz), which neither chroma bits nor a loudness contour tell apart.

The detail check. Where both sides also have their :mod:`soundlake.dedup.detail` (a 2.9 ms level
contour and a pitch track), a match must agree on those too, which parts those near-twins; and
bits down to ``NOISY_BITS`` (0.80) match when the detail agrees closely, which finds the faintly
noisy copies of mostly quiet clips that fall under FP_THRESHOLD. ``benchmarks/dedup.py`` prints
what is left of both weak cases.

``FingerprintIndex`` finds candidates through an inverted index on the items' top
``key_bits`` bits (AcoustID indexes the top 28), counts the keys a candidate shares, and
verifies the ones sharing ``min_hits`` keys with ``similarity``: no scan over all entries.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Iterator

import numpy as np

from soundlake.core.audio import resample
from soundlake.core.errors import UserError
from soundlake.dedup.detail import NOISY_BITS, Detail, detail_at_rate, details_agree

CHROMAPRINT_RATE = 11025     # Chromaprint's internal rate
ALGORITHM = 1                # CHROMAPRINT_ALGORITHM_TEST2, the default of fpcalc and AcoustID
MIN_OVERLAP = 20             # items (~2.5 s) two fingerprints must overlap to be compared
MIN_COVERAGE = 0.8           # ... and the share of the shorter one that overlap must cover
FP_THRESHOLD = 0.87          # 1 - bit error rate at which two clips are the same content
ITEM_HOP = 1365              # samples at CHROMAPRINT_RATE between fingerprint items (4096 / 3)
ENV_STEPS = 3                # envelope frames per item: the envelope aligns to a third of an item
ENV_HOP = ITEM_HOP // ENV_STEPS
ENV_MIN_DB = -90             # envelope floor, dB under the loudest frame
ENV_THRESHOLD = 0.93         # envelope correlation two matching clips must also reach


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("chromaprint")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    ptr, u32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
    for fn, res, args in (("chromaprint_new", ptr, [ctypes.c_int]), ("chromaprint_free", None, [ptr]),
                          ("chromaprint_start", ctypes.c_int, [ptr, ctypes.c_int, ctypes.c_int]),
                          ("chromaprint_feed", ctypes.c_int, [ptr, ptr, ctypes.c_int]),
                          ("chromaprint_finish", ctypes.c_int, [ptr]),
                          ("chromaprint_get_raw_fingerprint", ctypes.c_int,
                           [ptr, ctypes.POINTER(u32p), ctypes.POINTER(ctypes.c_int)]),
                          ("chromaprint_dealloc", None, [ptr]), ("chromaprint_get_version", ctypes.c_char_p, [])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


_LIB = _load()
FINGERPRINTER = (f"chromaprint-{_LIB.chromaprint_get_version().decode()}/alg2/soxr11025" if _LIB
                 else "chromaprint-missing")


def fingerprint(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mono float audio in [-1, 1] at ``sr`` Hz -> Chromaprint's raw fingerprint (uint32 items).

    Audio too short to fingerprint (under ~3 s) gives an empty array."""
    return features(audio, sr)[0]


def features(audio: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw fingerprint, loudness envelope) of mono float audio: see :func:`fingerprint` and
    :func:`envelope`; the audio is resampled once for both."""
    return _fingerprint_and_envelope(_at_chromaprint_rate(audio, sr))


def clip_features(audio: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray, Detail]:
    """(raw fingerprint, loudness envelope, fine detail) of mono float audio, resampled once for
    all three: what the fingerprint stage keeps of a clip."""
    x = _at_chromaprint_rate(audio, sr)
    return (*_fingerprint_and_envelope(x), detail_at_rate(x))


def _fingerprint_and_envelope(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not x.size:
        return np.zeros(0, np.uint32), np.zeros(0, np.int8)
    return _chromaprint(x), envelope(x)


def _at_chromaprint_rate(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mono float audio checked and resampled to CHROMAPRINT_RATE (empty stays empty)."""
    if _LIB is None:
        raise UserError("libchromaprint not found: install Debian's libchromaprint-tools (scripts/setup.sh)")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"fingerprint: mono audio expected (1-D), got shape {audio.shape}")
    if not (isinstance(sr, (int, np.integer)) and sr > 0):
        raise ValueError(f"fingerprint: sample rate must be a positive integer, got {sr!r}")
    if audio.size == 0:
        return np.zeros(0, np.float32)
    return resample(np.nan_to_num(audio.astype(np.float32, copy=False)), int(sr), CHROMAPRINT_RATE)


def _chromaprint(x: np.ndarray) -> np.ndarray:
    pcm = np.ascontiguousarray(np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16))
    ctx = _LIB.chromaprint_new(ALGORITHM)
    try:
        if not (_LIB.chromaprint_start(ctx, CHROMAPRINT_RATE, 1)
                and _LIB.chromaprint_feed(ctx, pcm.ctypes.data, pcm.size) and _LIB.chromaprint_finish(ctx)):
            raise RuntimeError("libchromaprint refused the audio")
        items, size = ctypes.POINTER(ctypes.c_uint32)(), ctypes.c_int()
        if not _LIB.chromaprint_get_raw_fingerprint(ctx, ctypes.byref(items), ctypes.byref(size)):
            return np.zeros(0, np.uint32)
        try:
            return np.ctypeslib.as_array(items, (size.value,)).copy() if size.value else np.zeros(0, np.uint32)
        finally:
            _LIB.chromaprint_dealloc(items)
    finally:
        _LIB.chromaprint_free(ctx)


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint32 (numpy >= 2 has a ufunc; older ones use a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_BITS[np.ascontiguousarray(x, np.uint32).view(np.uint8)].reshape(*x.shape, 4).sum(-1)


def envelope(x: np.ndarray) -> np.ndarray:
    """Loudness envelope of audio at CHROMAPRINT_RATE: the level (dB under the loudest frame,
    whole dB, floored at ENV_MIN_DB) of ITEM_HOP-sample frames every ENV_HOP samples, so that
    frame ``ENV_STEPS * i`` starts where fingerprint item ``i``'s frame does."""
    x = np.asarray(x, np.float64)
    n = (x.size - ITEM_HOP) // ENV_HOP + 1 if x.size >= ITEM_HOP else 0
    if n <= 0:
        return np.zeros(0, np.int8)
    power = np.cumsum(np.concatenate(([0.0], x * x)))
    start = np.arange(n) * ENV_HOP
    db = 10 * np.log10((power[start + ITEM_HOP] - power[start]) / ITEM_HOP + 1e-12)
    return np.clip(np.round(db - db.max()), ENV_MIN_DB, 0).astype(np.int8)


def envelope_agreement(a, b, offset: int, slack: int = ENV_STEPS) -> float:
    """Pearson correlation of two envelopes at the fingerprints' item ``offset`` (``a[k] ~
    b[k + ENV_STEPS * offset]``), the best within ``slack`` frames of it, so that a copy trimmed
    by a fraction of an item still lines up. An envelope that is flat over the overlap (under
    1 dB of spread: a steady sound) gives no evidence either way: 1.0. Too little overlap: 0.0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    best = 0.0
    for o in range(ENV_STEPS * offset - slack, ENV_STEPS * offset + slack + 1):
        lo, hi = max(0, -o), min(a.size, b.size - o)
        if hi - lo < MIN_OVERLAP:
            continue
        x, y = a[lo:hi], b[lo + o:hi + o]
        if x.std() < 1.0 or y.std() < 1.0:
            return 1.0
        best = max(best, float(np.corrcoef(x, y)[0, 1]))
    return best


def _as_items(fp) -> np.ndarray:
    a = np.asarray(fp)
    if a.ndim != 1:
        raise ValueError(f"a fingerprint is a 1-D array of uint32 items, got shape {a.shape}")
    return a.astype(np.uint32, copy=False)


def similarity(a, b, min_overlap: int = MIN_OVERLAP, *, min_coverage: float = MIN_COVERAGE) -> tuple[float, int]:
    """(1 - bit error rate, offset) at the best alignment ``a[i] ~ b[i + offset]``.

    Offsets count when their overlap has at least ``min_overlap`` items and covers at least
    ``min_coverage`` of the shorter fingerprint; (0.0, 0) when no offset does."""
    a, b = _as_items(a), _as_items(b)
    na, nb = a.size, b.size
    need = max(int(min_overlap), 1, int(np.ceil(min_coverage * min(na, nb) - 1e-9)))
    if min(na, nb) < need:
        return 0.0, 0
    offsets = np.arange(-(na - 1), nb)
    overlap = np.minimum(na, nb - offsets) - np.maximum(0, -offsets)
    valid = np.flatnonzero(overlap >= need)     # one run: the overlap rises, stays, falls
    # b padded with na - 1 empty items each side: window k holds b aligned at offset k - (na - 1)
    padded = np.zeros(nb + 2 * (na - 1), np.uint32)
    padded[na - 1:na - 1 + nb] = b
    real = np.zeros(padded.size, np.uint8)
    real[na - 1:na - 1 + nb] = 1
    errors = np.empty(valid.size, np.int64)
    step = max(1, 2**20 // na)
    for r in range(0, valid.size, step):
        window = valid[r:r + step, None] + np.arange(na)
        errors[r:r + step] = (popcount(padded[window] ^ a) * real[window]).sum(axis=1)
    score = 1.0 - errors / (32.0 * overlap[valid])
    best = int(np.argmax(score))
    return float(score[best]), int(offsets[valid[best]])


class FingerprintIndex:
    """Fingerprints by key, matched through an inverted index on their items' top bits.

    A query looks up its distinct keys (``item >> (32 - key_bits)``), counts how many each
    stored fingerprint shares, and verifies those with ``min_hits`` or more with
    :func:`similarity` and, where both have them, :func:`envelope_agreement` and
    :func:`soundlake.dedup.detail.details_agree`. Keys held by more
    than ``max_postings`` fingerprints (silence, a steady tone) are skipped: they select
    nothing. ``pairs`` runs the queries in blocks, so its memory is the index plus one block's
    postings."""

    def __init__(self, *, key_bits: int = 24, min_hits: int = 2, max_postings: int = 2000,
                 min_overlap: int = MIN_OVERLAP, min_coverage: float = MIN_COVERAGE,
                 env_threshold: float = ENV_THRESHOLD):
        if not 8 <= key_bits <= 32:
            raise ValueError(f"key_bits must be between 8 and 32, got {key_bits}")
        self.key_bits, self.min_hits, self.max_postings = key_bits, max(1, min_hits), max_postings
        self.min_overlap, self.min_coverage, self.env_threshold = min_overlap, min_coverage, env_threshold
        self._keys: list[str] = []
        self._pos: dict[str, int] = {}
        self._fps: list[np.ndarray] = []
        self._envs: list[np.ndarray | None] = []
        self._details: list[Detail | None] = []
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (keys, fingerprint numbers), by key

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, fp, env=None, detail: Detail | None = None) -> None:
        """Store a fingerprint, and its loudness envelope and fine detail when known (a match
        checks each only where both sides have it)."""
        if key in self._pos:
            raise ValueError(f"fingerprint index: key {key!r} added twice")
        self._pos[key] = len(self._keys)
        self._keys.append(key)
        self._fps.append(_as_items(fp).copy())
        self._envs.append(None if env is None else np.asarray(env, np.int8))
        self._details.append(detail)
        self._sorted = None

    def _keys_of(self, fps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(key, fingerprint number in ``fps``) of each distinct key of each fingerprint, by key."""
        items = np.concatenate(fps) if fps else np.zeros(0, np.uint32)
        owner = np.repeat(np.arange(len(fps), dtype=np.uint64), [fp.size for fp in fps])
        code = np.sort(((items >> np.uint32(32 - self.key_bits)).astype(np.uint64) << np.uint64(32)) | owner)
        code = code[np.concatenate(([True], code[1:] != code[:-1]))]   # np.unique's hashing is far slower
        return (code >> np.uint64(32)).astype(np.uint32), (code & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def _postings(self) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted is None:
            self._sorted = self._keys_of(self._fps)
        return self._sorted

    def _candidates(self, queries: list[np.ndarray], first: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(query number, stored number) sharing >= min_hits keys; with ``first`` set, the
        queries are stored numbers first, first+1, ... and only later ones are candidates."""
        keys, owner = self._postings()
        qkeys, qnum = self._keys_of(queries)
        lo, hi = np.searchsorted(keys, qkeys, "left"), np.searchsorted(keys, qkeys, "right")
        keep = (hi > lo) & (hi - lo <= self.max_postings)
        lo, n, qnum = lo[keep], (hi - lo)[keep], qnum[keep]
        # every (query, posting) hit, without a Python loop over the postings
        idx = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
        hit_q, hit_t = np.repeat(qnum, n), owner[idx]
        if first is not None:
            later = hit_t > hit_q + first
            hit_q, hit_t = hit_q[later], hit_t[later]
        code, count = np.unique(hit_q * len(self._keys) + hit_t, return_counts=True)
        code = code[count >= self.min_hits]
        return code // len(self._keys), code % len(self._keys)

    def _verify(self, q: np.ndarray, q_env, q_detail: Detail | None, t: int, threshold: float) -> float | None:
        """The bit similarity of a candidate when it reaches ``threshold`` and, where both sides
        have them, their loudness envelopes agree at the same offset (ENV_THRESHOLD) and so does
        their fine detail, within one item of it. With detail on both sides, bits down to
        NOISY_BITS also match when the detail agrees closely (``details_agree(noisy=True)``)."""
        t_env, t_detail = self._envs[t], self._details[t]
        detailed = q_detail is not None and t_detail is not None
        s, offset = similarity(q, self._fps[t], self.min_overlap, min_coverage=self.min_coverage)
        if s < (min(threshold, NOISY_BITS) if detailed else threshold):
            return None
        if q_env is not None and t_env is not None and envelope_agreement(q_env, t_env, offset) < self.env_threshold:
            return None
        if detailed and not details_agree(q_detail, t_detail, offset * ITEM_HOP, ITEM_HOP, noisy=s < threshold):
            return None
        return s

    def query(self, fp, threshold: float = FP_THRESHOLD, env=None, detail: Detail | None = None) -> list[tuple[str, float]]:
        """Stored (key, similarity) pairs that match (:meth:`_verify`: similarity >= ``threshold``,
        or down to NOISY_BITS with close detail; envelopes and detail checked when given), best first."""
        q = _as_items(fp)
        if not self._keys or q.size == 0:
            return []
        _, targets = self._candidates([q], None)
        q_env = None if env is None else np.asarray(env, np.int8)
        found = [(self._keys[t], s) for t in targets.tolist()
                 if (s := self._verify(q, q_env, detail, t, threshold)) is not None]
        return sorted(found, key=lambda kv: (-kv[1], kv[0]))

    def pairs(self, threshold: float = FP_THRESHOLD, block: int = 4096) -> Iterator[tuple[str, str, float]]:
        """Every matching pair of stored fingerprints (see :meth:`query`) once, as (a, b, s), a < b."""
        for start in range(0, len(self._keys), block):
            qs, ts = self._candidates(self._fps[start:start + block], start)
            for q, t in zip((qs + start).tolist(), ts.tolist()):
                if (s := self._verify(self._fps[q], self._envs[q], self._details[q], t, threshold)) is not None:
                    a, b = sorted((self._keys[q], self._keys[t]))
                    yield a, b, s

