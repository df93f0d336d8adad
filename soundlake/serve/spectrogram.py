"""A clip's spectrogram as a PNG: decoded from its FLAC bytes, STFT in numpy, a colour map from matplotlib."""
from __future__ import annotations

import io

import numpy as np

from soundlake.core.audio import decode_flac

WIDTH = 800           # at most this many time columns
N_FFT = 512
FLOOR_DB = -80.0


def spectrogram_png(flac: bytes) -> bytes:
    """Log-magnitude STFT (0 to Nyquist, bottom to top; 0 dB = the clip's loudest bin) as a PNG."""
    from matplotlib import image

    x = decode_flac(flac)[0].mean(axis=1)
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    hop = max(N_FFT // 4, -(-(x.size - N_FFT) // WIDTH))
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::hop] * np.hanning(N_FFT).astype(np.float32)
    mag = np.abs(np.fft.rfft(frames, axis=1)).T
    db = 20 * np.log10(np.maximum(mag, 1e-10))
    db = np.clip(db - db.max(), FLOOR_DB, 0)
    buf = io.BytesIO()
    image.imsave(buf, db, cmap="magma", vmin=FLOOR_DB, vmax=0, origin="lower", format="png")
    return buf.getvalue()
