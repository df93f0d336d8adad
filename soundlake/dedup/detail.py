"""Fine detail of a clip, to verify a fingerprint match: a fast loudness contour and a pitch track.

Chromaprint's items each sum ~2 s of 12-bin chroma at 8 items/s, and the coarse envelope
(:func:`soundlake.dedup.fingerprint.envelope`) has one frame per 41 ms. Two renderings of one
template at nearly the same parameters pass both as well as a copy does: drums at 117.5 and
121.3 bpm, falling chirps of 1.86 s and 1.95 s. A candidate pair is therefore also checked on

* ``contour``: the level (dB under the loudest frame, whole dB, floored at ``-CONTOUR_FLOOR_DB``) of
  Hann-weighted 256-sample frames every 32 samples (2.9 ms) at 11025 Hz. Two clips agree when
  the Pearson correlation over the frames where either is above the floor reaches
  ``CONTOUR_THRESHOLD`` at some lag near the fingerprints' offset: their onsets line up to a few
  ms, which a 3% tempo change breaks within a beat.
* ``pitch``: the strongest partial between 80 Hz and 5 kHz of 2048-sample frames every 256
  samples, in cents above 10 Hz (parabolic interpolation), 0 where the frame is not tonal
  (the peak is under 25 dB above the frame's median bin, or 40 dB under the clip's strongest).
  Two clips agree when the median absolute difference over frames tonal in both, at the
  contour's lag (interpolated between frames, so a trim between two frames is no pitch change),
  is at most ``PITCH_CENTS``: a chirp stretched by 5% or a bell 1% higher differs by more.

A faintly noisy copy of a mostly quiet clip can fall under FP_THRESHOLD in bits (the noise
rewrites the floor's items) while its detail stays the original's; bits down to ``NOISY_BITS``
therefore match when the detail agrees closely and the pitch is known (:func:`details_agree`
with ``noisy``): two noise bursts of one length have one contour but no pitch.

Calibration (``benchmarks/dedup.py`` prints it) on 300 10 s synth scenes each of seeds 5 and 11
at 44.1 kHz and seed 0 at 16 kHz, 60 of each given every alteration: copies re-encoded as MP3
128k, resampled, at -6 dB, trimmed by 1 s or with 30 dB SNR noise keep a contour correlation
>= 0.984 and a pitch difference <= 3 cents. Of the pairs of different scenes sharing a class
that pass bits and envelope (13, 13 and 14), the detail keeps 2, 2 and 1, each two renderings
of the synth's one hum waveform at lengths within 1% (cross-correlation >= 0.999).
About 4 KB a 10 s clip (a 345/s int8 contour, a 43/s int16 track), ~30 ms to compute.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from soundlake.core.audio import resample

RATE = 11025                 # Chromaprint's rate, so that a fingerprint's item offset converts
CONTOUR_WIN, CONTOUR_HOP = 256, 32
CONTOUR_FLOOR_DB = 40        # frames this far under the loudest are floor: they carry no evidence
PITCH_FFT, PITCH_HOP = 2048, 256
PITCH_BAND_HZ = (80.0, 5000.0)
TONAL_DB = 25.0              # a partial this far above its frame's median bin is a pitch
CONTOUR_THRESHOLD = 0.95     # contour correlation a copy reaches (calibration above)
PITCH_CENTS = 6.0            # median pitch difference a copy stays within
# Matches whose bits fall short of FP_THRESHOLD but reach NOISY_BITS (a faintly noisy copy of a
# mostly quiet clip: the noise rewrites the floor's items) must agree closely on both:
NOISY_BITS = 0.80
NOISY_CONTOUR = 0.99
NOISY_PITCH_CENTS = 4.0      # ... and the pitch must be known: a noise burst has none
THRESHOLDS = {"contour": CONTOUR_THRESHOLD, "pitch_cents": PITCH_CENTS, "noisy_bits": NOISY_BITS,
              "noisy_contour": NOISY_CONTOUR, "noisy_pitch_cents": NOISY_PITCH_CENTS}   # recorded with each run
MIN_FRAMES = 10              # fewer frames above the floor: no match; fewer tonal frames: no pitch evidence


class Detail(NamedTuple):
    contour: np.ndarray      # int8, dB under the loudest frame, one per CONTOUR_HOP samples
    pitch: np.ndarray        # int16, cents above 10 Hz (0: not tonal), one per PITCH_HOP samples


def detail(audio: np.ndarray, sr: int) -> Detail:
    """The level contour and pitch track of mono float audio at ``sr`` Hz."""
    return detail_at_rate(resample(np.nan_to_num(np.asarray(audio, np.float32)), int(sr), RATE))


def detail_at_rate(x: np.ndarray) -> Detail:
    """The detail of mono audio already at RATE (the fingerprint's resampled audio)."""
    x = np.asarray(x, np.float64)
    return Detail(contour(x), pitch_track(x))


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    if x.size < size:
        return np.zeros((0, size))
    return np.lib.stride_tricks.sliding_window_view(x, size)[::hop]


def contour(x: np.ndarray) -> np.ndarray:
    """dB of the Hann-weighted power of each CONTOUR_WIN frame of ``x`` (at RATE), under the loudest."""
    frames = _frames(x, CONTOUR_WIN, CONTOUR_HOP)
    if not len(frames):
        return np.zeros(0, np.int8)
    db = 10 * np.log10(frames ** 2 @ np.hanning(CONTOUR_WIN) ** 2 / CONTOUR_WIN + 1e-12)
    return np.clip(np.round(db - db.max()), -CONTOUR_FLOOR_DB, 0).astype(np.int8)


def pitch_track(x: np.ndarray) -> np.ndarray:
    """Cents above 10 Hz of each PITCH_FFT frame's strongest partial in PITCH_BAND_HZ (0: not tonal)."""
    frames = _frames(x, PITCH_FFT, PITCH_HOP)
    if not len(frames):
        return np.zeros(0, np.int16)
    spec = 20 * np.log10(np.abs(np.fft.rfft(frames * np.hanning(PITCH_FFT), axis=1)) + 1e-9)
    lo, hi = (int(f * PITCH_FFT / RATE) for f in PITCH_BAND_HZ)
    band = spec[:, lo:hi]
    k = lo + np.argmax(band, axis=1)
    rows = np.arange(len(frames))
    left, peak, right = spec[rows, k - 1], spec[rows, k], spec[rows, k + 1]
    curve = left - 2 * peak + right
    shift = np.clip(0.5 * (left - right) / np.where(np.abs(curve) < 1e-9, -1e-9, curve), -0.5, 0.5)
    hz = (k + shift) * RATE / PITCH_FFT
    tonal = (peak - np.median(band, axis=1) >= TONAL_DB) & (peak >= band.max() - CONTOUR_FLOOR_DB)
    return np.where(tonal, np.round(1200 * np.log2(hz / 10.0)), 0).astype(np.int16)


def contour_agreement(a, b, center: float, slack: int) -> tuple[float, float]:
    """(the best Pearson correlation of two level contours over the frames where either is above
    the floor, the lag ``d`` at which ``a[k] ~ b[k + d]`` gives it) for lags within ``slack``
    frames of ``center``, in half frames, over the frames of ``a`` that every lag searched
    overlaps. Contours steady over those frames in both (a hum) give no evidence: 1.0; steady
    in one only: 0.0; an overlap that is all floor matches nothing: 0.0. An empty contour (a
    clip too short to have one) gives no evidence: (1.0, center)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not a.size or not b.size:
        return 1.0, float(round(center))
    first, last = int(np.floor(center)) - slack, int(np.ceil(center)) + slack
    best, best_lag = 0.0, float(round(center))
    # b, and b half a frame later (a trim between two frames lines up too); all lags at once
    for half, y_all in ((0.0, b), (0.5, (b[:-1] + b[1:]) / 2)):
        lo, hi = max(0, -first), min(a.size, y_all.size - last)
        if hi - lo < MIN_FRAMES:
            continue
        x = a[lo:hi]
        ys = np.lib.stride_tricks.sliding_window_view(y_all, hi - lo)[lo + first:lo + last + 1]
        r = _masked_pearson(x, ys)
        if r.size and r.max() > best:
            best, best_lag = float(r.max()), first + int(np.argmax(r)) + half
    return best, best_lag


def _masked_pearson(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` with each row of ``ys`` over the frames where either is above
    the floor (-1 where fewer than MIN_FRAMES are; 1 where both are steady, 0 where one is)."""
    m = ((x > -CONTOUR_FLOOR_DB) | (ys > -CONTOUR_FLOOR_DB)).astype(np.float64)
    n = m.sum(axis=1)
    safe = np.maximum(n, 1)
    my = m * ys
    mean_x, mean_y = (m @ x) / safe, my.sum(axis=1) / safe
    var_x = np.maximum((m @ (x * x)) / safe - mean_x ** 2, 0.0)
    var_y = np.maximum((my * ys).sum(axis=1) / safe - mean_y ** 2, 0.0)
    cov = (my @ x) / safe - mean_x * mean_y
    steady_x, steady_y = var_x < 1.0, var_y < 1.0          # under 1 dB of spread
    r = np.where(steady_x | steady_y, (steady_x & steady_y).astype(np.float64),
                 cov / np.sqrt(np.maximum(var_x * var_y, 1e-12)))
    return np.where(n >= MIN_FRAMES, r, -1.0)


def pitch_difference(a, b, lag: float) -> float | None:
    """Median |a[k] - b(k + lag)| in cents over frames tonal in both, ``b`` interpolated between
    its frames; the smallest within an eighth of a frame of ``lag``. None: too few tonal frames."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    best = None
    for d in (lag - 0.125, lag, lag + 0.125):
        pos = np.arange(a.size) + d
        i = np.floor(pos).astype(np.int64)
        inside = (i >= 0) & (i + 1 < b.size)
        i, w, x = i[inside], (pos - np.floor(pos))[inside], a[inside]
        both = (x > 0) & (b[i] > 0) & (b[i + 1] > 0)
        if both.sum() < MIN_FRAMES:
            continue
        y = b[i[both]] * (1 - w[both]) + b[i[both] + 1] * w[both]
        m = float(np.median(np.abs(x[both] - y)))
        best = m if best is None else min(best, m)
    return best


def detail_agreement(a: Detail, b: Detail, offset_samples: float, slack_samples: int) -> tuple[float, float | None]:
    """(contour correlation, median pitch difference in cents or None) of two clips whose content
    lines up ``a[t] ~ b[t + offset_samples]`` (samples at RATE) within ``slack_samples``."""
    r, lag = contour_agreement(a.contour, b.contour, offset_samples / CONTOUR_HOP, int(np.ceil(slack_samples / CONTOUR_HOP)))
    return r, pitch_difference(a.pitch, b.pitch, lag * CONTOUR_HOP / PITCH_HOP)


def details_agree(a: Detail, b: Detail, offset_samples: float, slack_samples: int, *, noisy: bool = False) -> bool:
    """Whether two clips' details agree as a copy's do; ``noisy``: the closer agreement, with a
    known pitch, that a match by bits under FP_THRESHOLD (down to NOISY_BITS) needs."""
    r, cents = detail_agreement(a, b, offset_samples, slack_samples)
    if noisy:
        return r >= NOISY_CONTOUR and cents is not None and cents <= NOISY_PITCH_CENTS
    return r >= CONTOUR_THRESHOLD and (cents is None or cents <= PITCH_CENTS)
