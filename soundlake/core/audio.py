"""Decode, resample, measure and encode audio.

In-process decoding with libsndfile (soundfile) for wav/flac/ogg/opus/mp3/aiff;
one ``ffmpeg`` subprocess (with a timeout) for containers libsndfile cannot read
(m4a/aac, webm, mp4, mkv...). Measured here: ~34 ms per 10 s clip in-process vs
~134 ms per ffmpeg process, so ffmpeg is only the fallback. Resampling uses soxr
(high quality), loudness pyloudnorm (ITU-R BS.1770).
"""
from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

import numpy as np
import soundfile as sf
import soxr

from soundlake.core.errors import RowError, UserError

# Containers libsndfile reads in-process; everything else goes through ffmpeg.
SNDFILE_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64"}
FFMPEG_EXTS = {".m4a", ".aac", ".mp4", ".webm", ".mkv", ".mka", ".wma", ".mov", ".3gp"}
AUDIO_EXTS = SNDFILE_EXTS | FFMPEG_EXTS


@dataclass
class Decoded:
    audio: np.ndarray      # float32 [frames, channels]
    sample_rate: int
    codec: str             # e.g. "wav/ULAW", "ffmpeg/aac"
    truncated: bool = False            # the file holds less than its container promises
    promised_s: float | None = None    # what it promises, when the container says

    @property
    def duration(self) -> float:
        return self.audio.shape[0] / self.sample_rate

    @property
    def truncation(self) -> str:
        """One line saying how a truncated file falls short."""
        if self.promised_s is None:
            return f"truncated: the stream stops before its end-of-stream page, the file holds {self.duration:.2f} s"
        return f"truncated: the header promises {self.promised_s:.2f} s, the file holds {self.duration:.2f} s"


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 9 for b in head)  # no NUL/control bytes typical of binary media


def _check_readable(path: str) -> int:
    try:
        size = os.stat(path).st_size  # follows symlinks: loops raise ELOOP here
    except FileNotFoundError as e:
        raise RowError("not_found", f"file not found: {e.strerror}") from None
    except OSError as e:
        raise RowError("unreadable", f"cannot stat file: {e.strerror}") from None
    if size == 0:
        raise RowError("empty", "zero-byte file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise RowError("unreadable", f"cannot open file: {e.strerror}") from None
    if _looks_like_text(head):
        raise RowError("not_audio", "file holds text, not audio")
    return size


def probe(path: str, ffmpeg_timeout: float = 30.0) -> tuple[int, int, float, str]:
    """(sample_rate, channels, duration_s, codec) without decoding the samples."""
    try:
        info = sf.info(os.fsencode(path))
        return info.samplerate, info.channels, info.duration, f"{info.format}/{info.subtype}".lower()
    except (sf.LibsndfileError, RuntimeError):
        pass
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
           "stream=sample_rate,channels,codec_name:format=duration", "-of", "json", path]
    out = _run(cmd, ffmpeg_timeout)
    streams = json.loads(out.stdout or b"{}").get("streams") or []
    if not streams:
        raise RowError("unsupported", "no audio stream in the file")
    s = streams[0]
    duration = float(json.loads(out.stdout).get("format", {}).get("duration") or 0.0)
    return int(s.get("sample_rate") or 0), int(s.get("channels") or 0), duration, f"ffmpeg/{s.get('codec_name')}"


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RowError("timeout", f"{cmd[0]} took longer than {timeout:.0f} s") from None
    if out.returncode != 0:
        raise RowError(*_classify_ffmpeg(out.stderr.decode("utf-8", "replace")))
    return out


def _classify_ffmpeg(stderr: str) -> tuple[str, str]:
    last = next((l for l in reversed(stderr.strip().splitlines()) if l.strip()), "ffmpeg failed")
    low = stderr.lower()
    if "does not contain any stream" in low or "matches no streams" in low or "no audio stream" in low:
        return "unsupported", "no audio stream in the file"
    if "decoder" in low and ("not found" in low or "unknown" in low) or "unsupported codec" in low \
            or "could not find codec parameters" in low or "not implemented" in low:
        return "unsupported", f"unsupported codec: {last.strip()[:200]}"
    return "corrupt", f"cannot decode: {last.strip()[:200]}"


def local_path(uri: str) -> str:
    """A local file's path from a row's ``uri``: a path, or a ``file://`` URL (names that are
    not UTF-8), as a str whose undecodable bytes are surrogates (os.fsdecode)."""
    if uri.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(urlsplit(uri).path))
    return uri


def decode(path: str, ffmpeg_timeout: float = 60.0, max_duration: float | None = None) -> Decoded:
    """Decode a file to float32 [frames, channels] at its own rate, or raise RowError.

    ``truncated`` is set, not raised: whether that fails the input is the caller's policy."""
    _check_readable(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FFMPEG_EXTS:
        name = os.fsencode(path)   # libsndfile takes bytes: names that are not UTF-8 open too
        try:
            info = sf.info(name)
        except (sf.LibsndfileError, RuntimeError):
            info = None
        if info is not None:
            if max_duration and info.duration > max_duration:
                raise RowError("too_long", f"{info.duration:.0f} s is over segment.max_duration={max_duration:.0f} s")
            try:
                audio, sr = sf.read(name, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise RowError("corrupt", f"cannot decode: {e}") from None
            dec = Decoded(audio, sr, f"{info.format}/{info.subtype}".lower())
            intact, promised = container_length(path, info)
            dec.promised_s = promised / sr if promised is not None else None
            # libsndfile returns what it could read from a cut file; the slack absorbs codec padding.
            short = promised is not None and audio.shape[0] < promised - TRUNCATION_SLACK_S * sr
            dec.truncated = not intact or short
            return _check_finite(dec)
    return _check_finite(_decode_ffmpeg(path, ffmpeg_timeout, max_duration))


def _check_finite(dec: Decoded) -> Decoded:
    """``dec``, or a ``corrupt`` RowError when a sample is NaN or infinite (a float file can hold
    them; FLAC cannot encode them, and they poison every level)."""
    bad = int(np.count_nonzero(~np.isfinite(dec.audio)))
    if bad:
        raise RowError("corrupt", f"{bad} non-finite samples (NaN or Inf) among {dec.audio.size}")
    return dec


# A file holding this much less than its container promises is truncated.
TRUNCATION_SLACK_S = 0.05
_PCM_TAGS = {1, 3, 6, 7}    # WAVE format tags one frame per block_align: PCM, float, A-law, μ-law
_OPUS_RATE = 48000          # Ogg Opus granule positions count 48 kHz samples


def container_length(path: str, info) -> tuple[bool, int | None]:
    """(whether the stream ends intact, frames its container promises or None when it does not say).

    libsndfile clamps a WAV data chunk to the bytes present and counts an Ogg file to its last
    whole page, so both are read here; other formats use libsndfile's header count (MP3 has none)."""
    with open(path, "rb") as f:
        if info.format == "WAV":
            promised = _wav_promised_frames(f)
            if promised is not None:
                return True, promised
        elif info.format == "OGG":
            end = _ogg_end(f, info.samplerate)
            if end is not None:
                return end
    return True, (info.frames if info.frames > 0 and info.format != "MPEG" else None)


def _wav_promised_frames(f) -> int | None:
    """Frames the ``data`` chunk declares, for uncompressed RIFF/WAVE; None when unknown."""
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:] != b"WAVE":
        return None                      # RF64, W64...: libsndfile's count
    tag = align = None
    while len(chunk := f.read(8)) == 8:
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            body = f.read(min(size, 64))
            if len(body) >= 14:
                tag, align = struct.unpack("<H", body[:2])[0], struct.unpack("<H", body[12:14])[0]
            if tag == 0xFFFE and len(body) >= 26:     # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
                tag = struct.unpack("<H", body[24:26])[0]
            size -= len(body)
        elif cid == b"data":
            # 0 and 0xFFFFFFFF: a streaming writer that never knew the size
            if tag not in _PCM_TAGS or not align or size in (0, 0xFFFFFFFF):
                return None
            return size // align
        f.seek(size + (size & 1), os.SEEK_CUR)
    return None


def _ogg_end(f, sample_rate: int) -> tuple[bool, int | None] | None:
    """(intact, promised frames) from an Ogg file's last page, or None when it cannot be found.

    The last page must be whole and flagged end-of-stream (0x04); its granule position is the
    stream's length, which is only comparable when it belongs to the first (the decoded) stream."""
    first = f.read(27 + 255 + 19)
    if first[:4] != b"OggS":
        return None
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 65536 - 27 - 255))   # a page is at most 65 307 bytes
    tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:
        page = tail[at:]
        if len(page) < 27 or len(page) < 27 + page[26]:
            return False, None               # cut inside the page header
        end = 27 + page[26] + sum(page[27: 27 + page[26]])
        if page[4] == 0 and end >= len(page):  # a real page header reaching the end of the file
            if end > len(page) or not page[5] & 0x04:
                return False, None
            if page[14:18] != first[14:18]:
                return True, None                # another (multiplexed) stream's units
            granule = struct.unpack("<q", page[6:14])[0]
            if granule < 0:
                return True, None                # -1: no packet ends on the page, no length
            body = first[27 + first[26]:]
            if body[:8] == b"OpusHead":          # 48 kHz units, pre-skip included
                return True, round((granule - struct.unpack("<H", body[10:12])[0]) * sample_rate / _OPUS_RATE)
            return True, granule
        at = tail.rfind(b"OggS", 0, at)          # "OggS" inside packet data, or trailing bytes
    return None


def _decode_ffmpeg(path: str, timeout: float, max_duration: float | None) -> Decoded:
    sr, channels, duration, codec = probe(path, timeout)
    if sr <= 0 or channels <= 0:
        raise RowError("corrupt", "cannot read sample rate/channels from the stream")
    if max_duration and duration > max_duration:
        raise RowError("too_long", f"{duration:.0f} s is over segment.max_duration={max_duration:.0f} s")
    out = _run(["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-vn",
                "-f", "f32le", "-acodec", "pcm_f32le", "-"], timeout)
    audio = np.frombuffer(out.stdout, dtype="<f4")
    if audio.size == 0:
        raise RowError("corrupt", "decoder produced no samples")
    audio = audio[: audio.size - audio.size % channels].reshape(-1, channels)
    return Decoded(np.ascontiguousarray(audio, dtype=np.float32), sr, codec)


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Mix [frames, ch] to the wanted channel count; more than two to stereo is refused."""
    have = audio.shape[1]
    if have == channels:
        return audio
    if channels == 1:
        return audio.mean(axis=1, keepdims=True, dtype=np.float32)
    if have == 1:
        return np.repeat(audio, channels, axis=1)
    raise RowError("unsupported", f"{have}-channel audio cannot be mapped to {channels} channels; "
                                  "set segment.channels=1 to downmix")


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return audio
    return soxr.resample(audio, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _meter(sample_rate: int):
    """One BS.1770 meter per rate: it designs its K-weighting filters when built."""
    import pyloudnorm

    return pyloudnorm.Meter(sample_rate)


def levels(audio: np.ndarray, sample_rate: int, loudness: bool = True) -> tuple[float, float, float | None]:
    """(peak dBFS, RMS dBFS, integrated loudness LUFS or None)."""
    eps = 1e-10
    peak = float(20 * np.log10(np.max(np.abs(audio)) + eps))
    rms = float(20 * np.log10(np.sqrt(np.mean(np.square(audio, dtype=np.float64))) + eps))
    lufs = None
    if loudness and audio.shape[0] >= int(0.4 * sample_rate):
        value = _meter(sample_rate).integrated_loudness(audio)
        lufs = float(value) if np.isfinite(value) else None
    return peak, rms, lufs


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio, sr


def read_mono(path, sample_rate: int) -> np.ndarray:
    """An audio file (a path) -> mono float32 [frames] at ``sample_rate`` (channels averaged).

    For files a user names (reference clips): one line of UserError naming the file when
    libsndfile cannot decode it."""
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
        reason = " ".join(str(e).split())
        raise UserError(f"audio file {path}: cannot decode ({e.__class__.__name__}: {reason})") from None
    return resample(audio.mean(axis=1), sr, sample_rate)


def decode_mono(data: bytes, sample_rate: int) -> np.ndarray:
    """Stored FLAC bytes -> mono float32 [frames] at ``sample_rate`` (channels averaged)."""
    audio, sr = decode_flac(data)
    return np.ascontiguousarray(resample(audio.mean(axis=1, keepdims=True), sr, sample_rate)[:, 0])
