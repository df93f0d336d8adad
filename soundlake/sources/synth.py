"""The `synth` source: procedural soundscapes whose captions are known.

The offline ground truth of the project: captions are written from the scene's
structure, so caption accuracy, CLAP retrieval and filter precision can be measured
honestly. Deterministic for (seed, index): the plan and the audio come from
generators seeded with ``SeedSequence([seed, index])``, whatever the call order.

Scenes are a single event, a mixture of two overlapping events ("a siren wails while
white noise hisses") or a sequence ("a high beep repeats three times, then a bell rings").
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from soundlake.sources.base import input_row, register

SYNTH_CLASSES: tuple[str, ...] = ("beep", "chirp", "white_noise", "pink_noise", "brown_noise", "clicks",
                                  "siren", "drum", "hum", "bell", "speech")
BASE_CLASSES = tuple(c for c in SYNTH_CLASSES if c != "speech")
_COUNT_WORDS = {1: "once", 2: "twice", 3: "three times"}
_WORDS = ["seven", "river", "yellow", "window", "morning", "number", "garden", "silver", "market", "paper"]
# phrase fragment -> class, for reading a caption back (word boundaries; longest first)
_MENTIONS = [(r"\bwhite noise\b", "white_noise"), (r"\bpink noise\b", "pink_noise"),
             (r"\bbrown noise\b", "brown_noise"), (r"\bbeeps?\b", "beep"), (r"\bchirps?\b", "chirp"),
             (r"\bclick(s|ing)?\b", "clicks"), (r"\bsirens?\b", "siren"), (r"\bdrums?\b", "drum"),
             (r"\bhum(s|ming)?\b", "hum"), (r"\bbells?\b", "bell"), (r"\b(voice|speaks|speech)\b", "speech")]


@dataclass(frozen=True)
class SynthEvent:
    cls: str
    start: float
    end: float
    params: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class SynthScene:
    source_id: str
    seed: int
    index: int
    duration: float
    sample_rate: int
    events: list[SynthEvent]
    caption: str
    labels: list[str]
    kind: str  # single | mixture | sequence


# ---- planning (cheap: structure and caption, no audio) ------------------------------
def _event_params(cls: str, rng: np.random.Generator, dur: float) -> tuple[float, dict]:
    """(length in seconds, params) of one event."""
    if cls == "beep":
        high = bool(rng.integers(2))
        count = int(rng.integers(1, 4))
        return min(dur, 0.5 * count), {"pitch": "high" if high else "low", "count": count,
                                       "freq": float(rng.uniform(1500, 2500) if high else rng.uniform(300, 600))}
    if cls == "chirp":
        return min(dur, float(rng.uniform(1.0, 2.0))), {"direction": "rising" if rng.integers(2) else "falling"}
    if cls == "speech":
        words = [str(w) for w in rng.choice(_WORDS, size=3, replace=False)]
        return min(dur, 2.0), {"text": " ".join(words)}
    length = float(rng.uniform(1.5, 3.0))
    params: dict = {}
    if cls == "hum":
        params["mains"] = 50 if rng.integers(2) else 60
    elif cls == "bell":
        params["freq"] = float(rng.uniform(400, 900))
    elif cls == "drum":
        params["bpm"] = float(rng.uniform(100, 140))
    elif cls == "clicks":
        params["rate"] = float(rng.uniform(10, 20))
    elif cls == "siren":
        params["rate"] = float(rng.uniform(0.5, 1.0))
    return min(dur, length), params


def _phrase(e: SynthEvent) -> str:
    p = e.params
    if e.cls == "beep":
        if p["count"] == 1:
            return f"a {p['pitch']} beep sounds"
        return f"a {p['pitch']} beep repeats {_COUNT_WORDS[p['count']]}"
    return {"chirp": f"a {p.get('direction')} chirp sweeps", "white_noise": "white noise hisses",
            "pink_noise": "pink noise rushes", "brown_noise": "brown noise rumbles",
            "clicks": "rapid clicks tick", "siren": "a siren wails", "drum": "a steady drum beats",
            "hum": "a low electrical hum drones", "bell": "a bell rings", "speech": "a voice speaks"}[e.cls]


def _caption(kind: str, events: list[SynthEvent], rng: np.random.Generator) -> str:
    phrases = [_phrase(e) for e in events]
    if kind == "single":
        text = [phrases[0], f"{phrases[0]} in a quiet room", f"{phrases[0]} over faint background noise"][
            int(rng.integers(3))]
    elif kind == "mixture":
        text = f"{phrases[0]} while {phrases[1]}"
    else:
        text = ", then ".join(phrases)
    return text[0].upper() + text[1:] + "."


def plan_scene(seed: int, index: int, duration: float = 10.0, classes: Sequence[str] | None = None,
               speech: bool = False) -> SynthScene:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    pool = list(classes or BASE_CLASSES)
    if speech and "speech" not in pool and shutil.which("espeak-ng"):
        pool.append("speech")
    if not speech or not shutil.which("espeak-ng"):
        pool = [c for c in pool if c != "speech"]
    u = rng.random()
    kind = "single" if u < 0.5 or len(pool) < 2 else ("sequence" if u < 0.8 else "mixture")
    n = 1 if kind == "single" else (2 if kind == "mixture" else int(rng.integers(2, 4)))
    chosen = [str(c) for c in rng.choice(pool, size=min(n, len(pool)), replace=False)]
    events: list[SynthEvent] = []
    margin = min(0.2, 0.05 * duration)  # short scenes keep proportionally short margins
    if kind == "sequence":
        budget = duration / len(chosen)
        t = float(rng.uniform(margin, 2 * margin))
        for cls in chosen:
            length, params = _event_params(cls, rng, budget * 0.6)
            events.append(SynthEvent(cls, round(t, 4), round(t + length, 4), params))
            t += length + float(rng.uniform(margin, max(margin, budget * 0.3)))
    else:
        for cls in chosen:
            length, params = _event_params(cls, rng, duration * 0.8)
            start = float(rng.uniform(margin, max(margin, duration - length - margin)))
            if kind == "mixture" and events:  # overlap the first event
                start = float(np.clip(events[0].start + rng.uniform(-0.3, 0.3), 0.0, duration - length))
            events.append(SynthEvent(cls, round(start, 4), round(start + length, 4), params))
    caption = _caption(kind, events, rng)
    return SynthScene(source_id=f"{seed}-{index}", seed=seed, index=index, duration=duration, sample_rate=0,
                      events=events, caption=caption, labels=sorted({e.cls for e in events}), kind=kind)


# ---- rendering ----------------------------------------------------------------------
def _coloured_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    spec /= f ** (exponent / 2)
    x = np.fft.irfft(spec, n)
    return x / (np.max(np.abs(x)) + 1e-9)


def _env(n: int, sr: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    env = np.ones(n)
    a, r = min(n, int(attack * sr)), min(n, int(release * sr))
    if a:
        env[:a] = np.linspace(0, 1, a)
    if r:
        env[n - r:] *= np.linspace(1, 0, r)
    return env


def _speech(text: str, sr: int, n: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-w", f.name, text], check=True, timeout=30, capture_output=True)
        audio, rate = sf.read(f.name, dtype="float32")
    audio = soxr.resample(audio, rate, sr) if rate != sr else audio
    out = np.zeros(n)
    out[: min(n, len(audio))] = audio[:n]
    return out / (np.max(np.abs(out)) + 1e-9)


def _render_event(e: SynthEvent, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = max(1, int(round((e.end - e.start) * sr)))
    t = np.arange(n) / sr
    p = e.params
    if e.cls == "beep":
        x = np.zeros(n)
        one = int(0.25 * sr)
        for k in range(p["count"]):
            a = k * 2 * one
            seg = min(one, n - a)
            if seg > 0:
                x[a:a + seg] = np.sin(2 * np.pi * p["freq"] * t[:seg]) * _env(seg, sr, 0.005, 0.02)
        return x
    if e.cls == "chirp":
        f0, f1 = (300.0, 3000.0) if p["direction"] == "rising" else (3000.0, 300.0)
        T = max(t[-1], 1e-3)
        k = np.log(f1 / f0) / T
        return np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k) * _env(n, sr)
    if e.cls in ("white_noise", "pink_noise", "brown_noise"):
        exponent = {"white_noise": 0.0, "pink_noise": 1.0, "brown_noise": 2.0}[e.cls]
        return _coloured_noise(n, rng, exponent) * _env(n, sr, 0.05, 0.1)
    if e.cls == "clicks":
        x = np.zeros(n)
        step = int(sr / p["rate"])
        click = np.exp(-np.arange(int(0.004 * sr)) / (0.0008 * sr)) * rng.choice([-1, 1], int(0.004 * sr))
        for a in range(0, n - len(click), step):
            x[a:a + len(click)] += click
        return x
    if e.cls == "siren":
        freq = 900 + 300 * np.sin(2 * np.pi * p["rate"] * t)
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * _env(n, sr, 0.1, 0.2)
    if e.cls == "drum":
        x = np.zeros(n)
        step = int(sr * 60.0 / p["bpm"])
        m = int(0.25 * sr)
        tt = np.arange(m) / sr
        hit = np.sin(2 * np.pi * (55 * tt + 60 * (1 - np.exp(-tt * 30)) / 30)) * np.exp(-tt * 18)
        for a in range(0, n, step):
            seg = min(m, n - a)
            x[a:a + seg] += hit[:seg]
        return x
    if e.cls == "hum":
        f = p["mains"]
        x = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3, 4, 5))
        return x * _env(n, sr, 0.1, 0.1)
    if e.cls == "bell":
        f = p["freq"]
        x = sum(a * np.sin(2 * np.pi * f * r * t) * np.exp(-t * d)
                for r, a, d in ((1.0, 1.0, 1.5), (2.76, 0.6, 2.5), (5.4, 0.4, 4.0), (8.93, 0.25, 6.0)))
        return x * _env(n, sr, 0.002, 0.05)
    if e.cls == "speech":
        return _speech(p["text"], sr, n)
    raise ValueError(f"unknown synth class {e.cls!r}")


def render_scene(scene: SynthScene, sample_rate: int = 32000) -> np.ndarray:
    """float32 mono audio, len == round(duration * sample_rate), peak between -6 and -3 dBFS."""
    rng = np.random.default_rng(np.random.SeedSequence([scene.seed, scene.index, 1]))
    n = int(round(scene.duration * sample_rate))
    out = 10 ** (-50 / 20) * rng.standard_normal(n)  # faint background, never digital silence
    for e in scene.events:
        x = _render_event(e, sample_rate, rng)
        x = x / (np.max(np.abs(x)) + 1e-9)
        a = int(round(e.start * sample_rate))
        seg = min(len(x), n - a)
        if seg > 0:
            out[a:a + seg] += x[:seg]
    peak_db = rng.uniform(-6.0, -3.0)
    out *= 10 ** (peak_db / 20) / (np.max(np.abs(out)) + 1e-12)
    return out.astype(np.float32)


def synth_clip(seed: int, index: int, duration: float = 10.0, sample_rate: int = 32000,
               **kw) -> tuple[SynthScene, np.ndarray]:
    scene = plan_scene(seed, index, duration, **kw)
    scene.sample_rate = sample_rate
    return scene, render_scene(scene, sample_rate)


FLOOR_DBFS = -50.0  # the faint background render_scene puts under every scene's events


def event_in_scene(event: np.ndarray, sample_rate: int, duration: float = 10.0, seed: int = 0,
                   start: float | None = None) -> np.ndarray:
    """A short mono clip (a generated event, say) presented as a single-event scene is rendered:
    ``duration`` seconds of the faint background (``FLOOR_DBFS``, never digital silence), the
    clip peak-normalised and added at ``start`` seconds (default: centred), the whole scaled to a
    -4.5 dBFS peak (``render_scene``'s range is -6 to -3). A CLAP trained on 10 s scenes pads a
    shorter clip to its window with zeros, a silence it never heard in training; this is how
    such a CLAP hears a short clip the way it learnt scenes. Deterministic for ``seed``."""
    x = np.asarray(event, np.float64).reshape(-1)
    n = int(round(duration * sample_rate))
    if len(x) > n:
        raise ValueError(f"a {len(x) / sample_rate:.2f} s clip does not fit in a {duration:g} s scene")
    a = (n - len(x)) // 2 if start is None else int(round(start * sample_rate))
    if not 0 <= a <= n - len(x):
        raise ValueError(f"start {start} s puts the clip outside the {duration:g} s scene")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    out = 10 ** (FLOOR_DBFS / 20) * rng.standard_normal(n)
    out[a:a + len(x)] += x / (np.max(np.abs(x)) + 1e-9)
    out *= 10 ** (-4.5 / 20) / (np.max(np.abs(out)) + 1e-12)
    return out.astype(np.float32)


def caption_mentions(caption: str) -> set[str]:
    """The synth classes a caption names (inverse of the phrase vocabulary)."""
    text = caption.lower()
    return {cls for pattern, cls in _MENTIONS if re.search(pattern, text)}


def mismatched_caption(scene: SynthScene, rng_seed: int) -> str:
    """The caption of another scene whose label set differs (a negative for CLAP tests)."""
    rng = np.random.default_rng(rng_seed)
    for _ in range(1000):
        other = plan_scene(scene.seed, int(rng.integers(1_000_000, 2_000_000)), scene.duration)
        if set(other.labels) != set(scene.labels):
            return other.caption
    raise RuntimeError("no mismatched caption found")


# ---- the source ----------------------------------------------------------------------
def synth_inputs(count: int, seed: int, duration: float, speech: bool = False) -> list[dict]:
    rows = []
    for index in range(count):
        scene = plan_scene(seed, index, duration=duration, speech=speech)
        rows.append(input_row(
            source="synth", source_id=scene.source_id, uri=f"synth://{seed}/{index}?duration={duration}"
            + ("&speech=1" if speech else ""), labels=list(scene.labels), ref_caption=scene.caption,
            ref_caption_model="synth-v1", meta_json=json.dumps({"kind": scene.kind}),
            license="CC0"))
    return rows


@register("synth")
def list_synth(spec) -> tuple[list[dict], int]:
    src = spec.source
    return synth_inputs(src.count, src.seed, src.duration, src.speech), 0
