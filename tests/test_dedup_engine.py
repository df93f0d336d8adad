"""The duplicate-finding engine: Chromaprint fingerprints and their index, embedding
neighbours through faiss, duplicate groups and the kept clip.

Planted cases are soundlake's own synth clips (10 s scenes of 2-3 events in sequence)
re-encoded, resampled, made quieter, trimmed and mixed with faint noise: each must match its
original at ``FP_THRESHOLD``; different clips sharing a synth class must not.
"""
from __future__ import annotations

import itertools
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from soundlake.dedup.detail import (
    CONTOUR_FLOOR_DB,
    CONTOUR_HOP,
    CONTOUR_THRESHOLD,
    CONTOUR_WIN,
    MIN_FRAMES,
    NOISY_BITS,
    PITCH_CENTS,
    PITCH_HOP,
    RATE,
    Detail,
    contour,
    contour_agreement,
    detail,
    detail_agreement,
    pitch_difference,
    pitch_track,
)
from soundlake.dedup.fingerprint import (
    CHROMAPRINT_RATE,
    ENV_HOP,
    ENV_MIN_DB,
    ENV_STEPS,
    ENV_THRESHOLD,
    FINGERPRINTER,
    FP_THRESHOLD,
    ITEM_HOP,
    FingerprintIndex,
    envelope,
    envelope_agreement,
    features,
    fingerprint,
    similarity,
)
from soundlake.dedup.groups import LICENSE_RANK, connected_groups, keep_order, pick_kept
from soundlake.dedup.neighbors import semantic_pairs
from soundlake.sources.licenses import LICENSES
from soundlake.sources.synth import plan_scene, synth_clip

SR = 44100
SEED = 19


# ---- similarity: the bit error rate, by hand -------------------------------------------
def test_similarity_is_one_minus_the_bit_error_rate_at_the_best_offset():
    a = np.array([0x00000000, 0xFFFFFFFF, 0x0F0F0F0F, 0x12345678], np.uint32)
    # b[i + 1] is a[i] with 1, 2, 0 and 8 bits flipped; b[0] is unrelated
    b = np.array([0xCAFEBABE, 0x00000001, 0xFFFFFFFC, 0x0F0F0F0F, 0x12345687], np.uint32)
    s, offset = similarity(a, b, min_overlap=4, min_coverage=1.0)
    assert offset == 1
    assert s == pytest.approx(1 - (1 + 2 + 0 + 8) / (32 * 4))
    s_back, offset_back = similarity(b, a, min_overlap=4, min_coverage=1.0)
    assert (s_back, offset_back) == (pytest.approx(s), -1)
    assert similarity(a, a, min_overlap=4) == (1.0, 0)


def test_similarity_needs_enough_overlap():
    a = np.arange(10, dtype=np.uint32)
    assert similarity(a, a, min_overlap=11) == (0.0, 0)
    assert similarity(a, np.zeros(0, np.uint32)) == (0.0, 0)
    # a 3-item overlap at offset 7 is perfect, but covers 3/10 of the shorter one
    b = np.concatenate([np.full(7, 0xFFFFFFFF, np.uint32), a[:3]])
    assert similarity(a, b, min_overlap=3, min_coverage=0.0) == (1.0, 7)
    s, _ = similarity(a, b, min_overlap=3, min_coverage=0.8)
    assert s < 0.75


def _naive_similarity(a, b, need):
    best = (0.0, 0)
    for off in range(-(len(a) - 1), len(b)):
        idx = [i for i in range(len(a)) if 0 <= i + off < len(b)]
        if len(idx) >= need:
            errors = sum(bin(int(a[i]) ^ int(b[i + off])).count("1") for i in idx)
            if 1 - errors / (32 * len(idx)) > best[0]:
                best = (1 - errors / (32 * len(idx)), off)
    return best


def test_similarity_matches_a_plain_loop_over_offsets():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.integers(0, 2**32, rng.integers(5, 30), dtype=np.uint32)
        b = np.concatenate([rng.integers(0, 2**32, rng.integers(0, 6), dtype=np.uint32),
                            a[rng.integers(0, 4):] ^ (rng.random(1) < 0.5).astype(np.uint32)])
        need = max(4, int(np.ceil(0.5 * min(len(a), len(b)))))
        got = similarity(a, b, min_overlap=4, min_coverage=0.5)
        want = _naive_similarity(a, b, need)
        assert got[0] == pytest.approx(want[0]) and got[1] == want[1]


def test_similarity_refuses_non_1d_input():
    with pytest.raises(ValueError, match="1-D"):
        similarity(np.zeros((2, 2), np.uint32), np.zeros(4, np.uint32))


# ---- planted audio cases -------------------------------------------------------------------
def _mp3_128k(audio: np.ndarray, tmp) -> np.ndarray:
    sf.write(str(tmp / "in.wav"), audio, SR)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(tmp / "in.wav"), "-b:a", "128k",
                    str(tmp / "out.mp3")], check=True, timeout=60)
    out, rate = sf.read(str(tmp / "out.mp3"), dtype="float32")
    assert rate == SR
    return out


def _variants(audio: np.ndarray, rng: np.random.Generator, tmp) -> dict[str, np.ndarray]:
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    return {
        "mp3_128k": _mp3_128k(audio, tmp),
        "resampled": soxr.resample(soxr.resample(audio, SR, 22050), 22050, SR),
        "gain_-6dB": audio * np.float32(10 ** (-6 / 20)),
        "trimmed_1s": audio[SR:],
        "noise_30dB_snr": audio + rng.standard_normal(audio.size).astype(np.float32) * np.float32(rms * 10 ** (-30 / 20)),
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """16 sequence scenes, 6 of them with 5 altered copies each: fingerprints, labels, copies'
    fingerprints and everyone's loudness envelope."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    indices = [i for i in range(200) if plan_scene(SEED, i).kind == "sequence"][:16]
    originals, labels, copies, envs = {}, {}, {}, {}
    for n, index in enumerate(indices):
        scene, audio = synth_clip(SEED, index, 10.0, SR)
        key = f"clip{index:03d}"
        (originals[key], envs[key]), labels[key] = features(audio, SR), set(scene.labels)
        if n < 6:
            copies[key] = {}
            for name, x in _variants(audio, rng, tmp).items():
                copies[key][f"{key}/{name}"], envs[f"{key}/{name}"] = features(x, SR)
    return originals, labels, copies, envs


def test_fingerprint_shape_and_short_audio():
    assert FINGERPRINTER.startswith("chromaprint-1.") and "alg2" in FINGERPRINTER
    _, audio = synth_clip(SEED, 0, 10.0, SR)
    fp = fingerprint(audio, SR)
    assert fp.dtype == np.uint32 and 50 <= fp.size <= 70          # ~8 items/s after ~2.6 s
    assert np.array_equal(fingerprint(audio.astype(np.float64), SR), fp)
    assert fingerprint(np.zeros(0, np.float32), SR).size == 0
    assert fingerprint(audio[: SR // 2], SR).size == 0              # too short: empty, not an error
    with pytest.raises(ValueError, match="mono"):
        fingerprint(np.stack([audio, audio], axis=1), SR)


def test_altered_copies_match_their_original(planted):
    originals, _, copies, envs = planted
    index = FingerprintIndex()
    for key, fp in originals.items():
        index.add(key, fp, envs[key])
    lowest = {}
    for key, family in copies.items():
        for name, fp in family.items():
            s, offset = similarity(originals[key], fp)
            e = envelope_agreement(envs[key], envs[name], offset)
            kind = name.split("/")[1]
            lowest[kind] = (min(s, lowest.get(kind, (1.0,))[0]), min(e, lowest.get(kind, (1.0, 1.0))[1]))
            assert s >= FP_THRESHOLD, f"{name}: similarity {s:.3f} < {FP_THRESHOLD}"
            assert e >= ENV_THRESHOLD, f"{name}: envelope agreement {e:.3f} < {ENV_THRESHOLD}"
            found = dict(index.query(fp, env=envs[name]))
            assert key in found, f"{name}: the index did not find {key}"
    print("lowest (similarity, envelope agreement) to the original:",
          {k: (round(s, 3), round(e, 3)) for k, (s, e) in lowest.items()})


def test_different_clips_of_a_class_do_not_match(planted):
    originals, labels, _, _ = planted
    same_class = [(a, b) for a, b in itertools.combinations(sorted(originals), 2) if labels[a] & labels[b]]
    assert len(same_class) >= 30
    scores = {(a, b): similarity(originals[a], originals[b])[0] for a, b in same_class}
    worst = max(scores, key=scores.get)
    print(f"{len(scores)} same-class pairs, highest similarity {scores[worst]:.3f} {worst}")
    assert scores[worst] < FP_THRESHOLD


def test_index_pairs_are_the_planted_families(planted):
    originals, _, copies, envs = planted
    index = FingerprintIndex()
    for key, fp in itertools.chain(originals.items(), *(f.items() for f in copies.values())):
        index.add(key, fp, envs[key])
    pairs = list(index.pairs(FP_THRESHOLD))
    assert all(a < b for a, b, _ in pairs) and len({(a, b) for a, b, _ in pairs}) == len(pairs)
    groups = connected_groups((a, b) for a, b, _ in pairs)
    families = {}
    for clip, group in groups.items():
        families.setdefault(group, set()).add(clip)
    assert sorted(map(sorted, families.values())) == sorted(sorted({k, *f}) for k, f in copies.items())


# ---- the loudness envelope and its agreement, by hand ---------------------------------------
def test_envelope_is_each_frames_level_under_the_loudest_frame():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(CHROMAPRINT_RATE * 3) * np.repeat([0.001, 0.5, 0.02], CHROMAPRINT_RATE)
    x[-CHROMAPRINT_RATE // 4:] = 0.0                                    # digital silence: the floor
    levels = []
    for start in range(0, x.size - ITEM_HOP + 1, ENV_HOP):            # a plain loop over the frames
        levels.append(10 * np.log10(np.mean(x[start:start + ITEM_HOP] ** 2) + 1e-12))
    want = np.clip(np.round(np.array(levels) - max(levels)), ENV_MIN_DB, 0)
    got = envelope(x)
    assert ENV_STEPS * ENV_HOP == ITEM_HOP and got.dtype == np.int8
    assert np.array_equal(got, want.astype(np.int8))
    assert got.min() == ENV_MIN_DB and got.max() == 0
    assert envelope(x[: ITEM_HOP - 1]).size == 0


def test_envelope_agreement_is_pearson_at_the_fingerprints_offset():
    rng = np.random.default_rng(4)
    a = rng.integers(-60, 0, 120).astype(np.int8)
    b = np.concatenate([rng.integers(-60, 0, 7), a // 2 - 5]).astype(np.int8)   # a, 7 frames later, rescaled
    # item offset 2 is frame 6, one frame short of the true shift: inside the default slack
    assert envelope_agreement(a, b, 2) == pytest.approx(np.corrcoef(a, (a // 2 - 5))[0, 1])
    assert envelope_agreement(a, b, 2, slack=0) < 0.5                 # six frames: a's own lag-1 correlation
    c = rng.integers(-60, 0, 120).astype(np.int8)
    assert envelope_agreement(a, c, 0, slack=0) == pytest.approx(np.corrcoef(a, c)[0, 1])
    flat = np.full(120, -3, np.int8)
    assert envelope_agreement(a, flat, 0) == 1.0                      # a steady sound: no evidence
    assert envelope_agreement(a[:10], c[:10], 0) == 0.0               # too little overlap


def test_the_envelope_check_parts_renders_of_one_template_and_keeps_copies(tmp_path):
    """Two single-drum scenes (seed 7: 105.9 and 136.9 bpm at other times) share 87% of their
    bits, above FP_THRESHOLD; their loudness contours do not agree. Altered copies of one still
    match it with the check on."""
    rng = np.random.default_rng(1)
    (fp_a, env_a), (fp_b, env_b) = (features(synth_clip(7, i, 10.0, SR)[1], SR) for i in (38, 108))
    s, offset = similarity(fp_a, fp_b)
    assert s >= FP_THRESHOLD and envelope_agreement(env_a, env_b, offset) < ENV_THRESHOLD
    bits_only, checked = FingerprintIndex(), FingerprintIndex()
    bits_only.add("a", fp_a), checked.add("a", fp_a, env_a)
    bits_only.add("b", fp_b), checked.add("b", fp_b, env_b)
    for name, x in _variants(synth_clip(7, 38, 10.0, SR)[1], rng, tmp_path).items():
        checked.add(name, *features(x, SR))
    assert [p[:2] for p in bits_only.pairs()] == [("a", "b")]
    pairs = {p[:2] for p in checked.pairs()}
    assert not {("a", "b")} & pairs
    assert sum("a" in p for p in pairs) == 5                          # a with each of its five copies
    assert not any("b" in p for p in pairs)
    assert checked.query(fp_b, env=env_b) == [("b", 1.0)]


# ---- the fine detail (contour and pitch), by hand -------------------------------------------
def test_contour_is_each_hann_frames_level_under_the_loudest():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(4 * 2756) * np.repeat([0.001, 0.5, 0.05, 0.0], 2756)
    w = np.hanning(CONTOUR_WIN) ** 2
    levels = [10 * np.log10(np.sum(x[s:s + CONTOUR_WIN] ** 2 * w) / CONTOUR_WIN + 1e-12)
              for s in range(0, x.size - CONTOUR_WIN + 1, CONTOUR_HOP)]
    want = np.clip(np.round(np.array(levels) - max(levels)), -CONTOUR_FLOOR_DB, 0).astype(np.int8)
    got = contour(x)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    assert got.min() == -CONTOUR_FLOOR_DB and got.max() == 0
    assert contour(x[: CONTOUR_WIN - 1]).size == 0


def test_pitch_track_is_the_strongest_partials_cents_and_zero_where_not_tonal():
    rng = np.random.default_rng(6)
    t = np.arange(RATE) / RATE
    tone = 0.5 * np.sin(2 * np.pi * 441.0 * t) + 0.1 * np.sin(2 * np.pi * 1500.0 * t)
    x = np.concatenate([tone, 0.3 * rng.standard_normal(RATE), np.zeros(RATE)])
    got = pitch_track(x)
    frame_of = lambda sec: int(sec * RATE / PITCH_HOP)  # noqa: E731
    in_tone, in_noise, in_silence = got[: frame_of(0.8)], got[frame_of(1.2):frame_of(1.8)], got[frame_of(2.2):]
    assert got.dtype == np.int16
    assert np.all(np.abs(in_tone - 1200 * np.log2(441.0 / 10.0)) <= 2)   # 441 Hz, not its weaker partner
    assert not in_noise.any() and not in_silence.any()


def test_contour_agreement_is_pearson_over_active_frames_at_the_best_lag():
    rng = np.random.default_rng(7)
    a = rng.integers(-CONTOUR_FLOOR_DB, 1, 200).astype(np.int8)
    b = np.concatenate([rng.integers(-CONTOUR_FLOOR_DB, 1, 7), a]).astype(np.int8)   # a, 7 frames later
    assert contour_agreement(a, b, 5.0, 3) == (pytest.approx(1.0), 7.0)
    r, lag = contour_agreement(a, b, 0.0, 3)                                      # 7 is out of reach
    assert r < 0.5 and abs(lag) <= 3
    c = rng.integers(-CONTOUR_FLOOR_DB, 1, 200).astype(np.int8)
    active = (a > -CONTOUR_FLOOR_DB) | (c > -CONTOUR_FLOOR_DB)
    want = np.corrcoef(a[active].astype(float), c[active].astype(float))[0, 1]
    assert contour_agreement(a, c, 0.0, 0) == (pytest.approx(want), 0.0)
    floor, steady = np.full(200, -CONTOUR_FLOOR_DB, np.int8), np.full(200, -3, np.int8)
    assert contour_agreement(floor, floor, 0.0, 2)[0] == 0.0                     # silence against silence matches nothing
    assert contour_agreement(steady, steady, 0.0, 2)[0] == 1.0                   # a steady sound in both: no evidence
    assert contour_agreement(a, steady, 0.0, 2)[0] == 0.0                        # steady in one only: they differ
    assert contour_agreement(a, np.zeros(0, np.int8), 3.0, 2) == (1.0, 3.0)      # no contour: no evidence


def test_pitch_difference_is_the_median_over_frames_tonal_in_both():
    a = np.full(40, 4000, np.int16)
    a[:5] = 0                                                              # not tonal: left out
    b = a + np.int16(12)
    b[:5], b[30:33] = 0, 4300                                              # three outliers: the median ignores them
    assert pitch_difference(a, b, 0.0) == 12.0
    # a sweep of 20 cents a frame; b is the same sweep half a frame earlier, read between its frames
    ramp = (3000 + 20 * np.arange(40)).astype(np.int16)
    late = (ramp + 10).astype(np.int16)
    assert pitch_difference(ramp, late, -0.5) == 0.0
    assert pitch_difference(ramp, late, 0.0) == pytest.approx(10 - 20 / 8)   # the best of lags -1/8, 0, +1/8
    assert pitch_difference(a[:MIN_FRAMES + 4], np.zeros(MIN_FRAMES + 4, np.int16), 0.0) is None


def test_the_detail_parts_near_twins_and_keeps_their_copies(tmp_path):
    """Seed 5's drums at 117.5 and 121.3 bpm and falling chirps of 1.95 s and 1.86 s pass the bits
    and the envelope like copies do; the contour parts the drums (onsets drift 16 ms a beat), the
    pitch track parts the chirps (a 5% stretch). Each one's five altered copies still match it."""
    rng = np.random.default_rng(2)
    fps, envs, details = {}, {}, {}

    def put(name, audio):
        (fps[name], envs[name]), details[name] = features(audio, SR), detail(audio, SR)

    for index in (59, 356, 131, 331):
        audio = synth_clip(5, index, 10.0, SR)[1]
        put(f"s{index}", audio)
        if index in (59, 131):
            for name, x in _variants(audio, rng, tmp_path).items():
                put(f"s{index}/{name}", x)
    for a, b, part in (("s59", "s356", "contour"), ("s131", "s331", "pitch")):
        s, offset = similarity(fps[a], fps[b])
        assert s >= FP_THRESHOLD and envelope_agreement(envs[a], envs[b], offset) >= ENV_THRESHOLD
        r, cents = detail_agreement(details[a], details[b], offset * ITEM_HOP, ITEM_HOP)
        assert (r < CONTOUR_THRESHOLD) if part == "contour" else (cents is not None and cents > PITCH_CENTS), (r, cents)
    index = FingerprintIndex()
    for name in fps:
        index.add(name, fps[name], envs[name], details[name])
    families = {}
    for clip, group in connected_groups(p[:2] for p in index.pairs()).items():
        families.setdefault(group, set()).add(clip)
    assert sorted(map(sorted, families.values())) == [sorted(n for n in fps if n.startswith(k))
                                                      for k in ("s131", "s59")]
    assert all(len(f) == 6 for f in families.values())                  # the original and its five copies
    assert isinstance(details["s59"], Detail) and details["s59"].contour.size > 3000


def test_faintly_noisy_copies_of_quiet_clips_match_through_close_detail():
    """A 30 dB SNR copy of a clip that is mostly a quiet floor (seed 5: a beep, a chirp) falls
    under FP_THRESHOLD in bits (the noise rewrites the floor's items); with detail on both sides
    it still matches, as its contour and pitch agree closely. Two white-noise bursts of nearly one
    length (2.96 s, 2.89 s) reach the same bits band and contour but have no pitch: not a match."""
    fps, envs, details = {}, {}, {}
    for index in (68, 82, 122, 161):
        audio = synth_clip(5, index, 10.0, SR)[1]
        rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
        noise = np.random.default_rng(index).standard_normal(audio.size).astype(np.float32) * np.float32(rms * 10 ** -1.5)
        for name, x in ((f"s{index}", audio), (f"s{index}/noisy", audio + noise))[: 2 if index < 100 else 1]:
            (fps[name], envs[name]), details[name] = features(x, SR), detail(x, SR)
    for a, b in (("s68", "s68/noisy"), ("s82", "s82/noisy"), ("s122", "s161")):
        s, offset = similarity(fps[a], fps[b])
        r, cents = detail_agreement(details[a], details[b], offset * ITEM_HOP, ITEM_HOP)
        assert NOISY_BITS <= s < FP_THRESHOLD and r >= CONTOUR_THRESHOLD, (a, b, s, r)
        assert (cents is None) == (a == "s122"), (a, b, cents)
    with_detail, without = FingerprintIndex(), FingerprintIndex()
    for name in fps:
        with_detail.add(name, fps[name], envs[name], details[name])
        without.add(name, fps[name], envs[name])
    assert not {p[:2] for p in without.pairs()} & {("s68", "s68/noisy"), ("s82", "s82/noisy")}
    assert {p[:2] for p in with_detail.pairs()} == {("s68", "s68/noisy"), ("s82", "s82/noisy")}
    found = dict(with_detail.query(fps["s68/noisy"], env=envs["s68/noisy"], detail=details["s68/noisy"]))
    assert set(found) == {"s68", "s68/noisy"} and found["s68"] < FP_THRESHOLD


# ---- the index against brute force --------------------------------------------------------
def _random_corpus(n: int, copies: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random fingerprints of 60-200 items and trimmed copies with up to 10% of their bits flipped
    (Chromaprint copies of real clips measure 0-11%)."""
    fps = {f"r{i:04d}": rng.integers(0, 2**32, rng.integers(60, 200), dtype=np.uint32) for i in range(n)}
    for j, src in enumerate(rng.choice(sorted(fps), copies, replace=False)):
        x = fps[src][rng.integers(0, 10):]
        flips = rng.random((x.size, 32)) < rng.uniform(0.0, 0.10)
        fps[f"{src}-copy{j}"] = x ^ (flips * (1 << np.arange(32, dtype=np.uint64))).sum(1).astype(np.uint32)
    return fps


def test_index_finds_what_brute_force_finds():
    rng = np.random.default_rng(7)
    fps = _random_corpus(150, 40, rng)
    keys = sorted(fps)
    index = FingerprintIndex()
    for k in keys:
        index.add(k, fps[k])
    index.add("empty", np.zeros(0, np.uint32))
    score = {(a, b): similarity(fps[a], fps[b])[0] for a, b in itertools.combinations(keys, 2)}
    for threshold in (FP_THRESHOLD, 0.9):
        brute = {pair for pair, s in score.items() if s >= threshold}
        assert 20 <= len(brute) <= 40       # the copies whose flips stayed under the threshold
        assert {(a, b) for a, b, _ in index.pairs(threshold, block=64)} == brute
        for k in keys[:40]:
            want = sorted(b if a == k else a for a, b in brute if k in (a, b))
            assert sorted(m for m, _ in index.query(fps[k], threshold) if m != k) == want


def test_index_refuses_a_key_twice_and_answers_empty():
    index = FingerprintIndex()
    assert index.query(np.arange(50, dtype=np.uint32)) == [] and list(index.pairs()) == []
    index.add("a", np.arange(50, dtype=np.uint32))
    with pytest.raises(ValueError, match="added twice"):
        index.add("a", np.arange(50, dtype=np.uint32))
    assert index.query(np.zeros(0, np.uint32)) == []


# ---- groups and the kept clip ---------------------------------------------------------------
def test_connected_groups_are_components_named_by_their_smallest_id():
    pairs = [("d", "e"), ("b", "c"), ("c", "d"), ("e", "a"), ("y", "x"), ("z", "y"), ("m", "n")]
    assert connected_groups(pairs) == {"a": "a", "b": "a", "c": "a", "d": "a", "e": "a",
                                       "x": "x", "y": "x", "z": "x", "m": "m", "n": "m"}
    assert connected_groups([]) == {}
    assert connected_groups([("k", "k")]) == {"k": "k"}


def test_license_rank_names_every_soundlake_license():
    assert set(LICENSE_RANK) == set(LICENSES)
    order = sorted(LICENSE_RANK, key=LICENSE_RANK.get)
    assert order[:4] == ["CC0", "PDM", "CC-BY", "CC-BY-SA"] and order.index("CC-BY-NC") > order.index("CC-BY-SA")
    assert order[-1] == "YouTube"


def _m(clip_id, license="CC-BY", score=0.5, duration_s=10.0):
    return dict(clip_id=clip_id, license=license, score=score, duration_s=duration_s)


@pytest.mark.parametrize("members,kept", [
    ([_m("a", "CC-BY-NC", score=0.9), _m("b", "CC0", score=0.1)], "b"),            # license first
    ([_m("a", None), _m("b", "YouTube")], "b"),                                     # unknown is last
    ([_m("a", "cc-by-sa"), _m("b", "CC-BY-NC")], "a"),                              # ids in any case
    ([_m("a", score=0.2, duration_s=30.0), _m("b", score=0.7)], "b"),               # then caption score
    ([_m("a", score=None, duration_s=30.0), _m("b", score=0.0)], "b"),              # no score is last
    ([_m("a", duration_s=5.0), _m("b", duration_s=9.5)], "b"),                      # then the longest
    ([_m("c"), _m("b"), _m("d")], "b"),                                              # then the smallest id
])
def test_pick_kept_follows_the_rule(members, kept):
    assert pick_kept(members) == kept
    assert pick_kept(list(reversed(members))) == kept
    assert min(members, key=keep_order)["clip_id"] == kept


def test_pick_kept_refuses_an_empty_group():
    with pytest.raises(ValueError, match="at least one"):
        pick_kept([])


# ---- semantic pairs: faiss against brute force -----------------------------------------
def _clustered(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Members of 300 clusters (cosine 0.5-0.96 inside one) and 5% planted copies (0.96-0.999)."""
    centres = rng.standard_normal((300, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    k = rng.integers(0, 300, n)
    spread = rng.uniform(0.2, 1.0, 300)[k]
    x = centres[k] + rng.standard_normal((n, d)).astype(np.float32) * (spread / np.sqrt(d))[:, None].astype(np.float32)
    copies = n // 20
    src = rng.choice(n - copies, copies, replace=False)
    unit = x[src] / np.linalg.norm(x[src], axis=1, keepdims=True)
    noise = rng.standard_normal((copies, d)).astype(np.float32)
    noise *= (rng.uniform(0.045, 0.29, copies) / np.linalg.norm(noise, axis=1))[:, None]
    x[n - copies:] = unit + noise
    return x, set(zip(src.tolist(), range(n - copies, n)))


def test_semantic_pairs_ann_matches_exact_on_clustered_data():
    rng = np.random.default_rng(11)
    n, d = 20_000, 32
    x, planted_pairs = _clustered(n, d, rng)
    ids = [f"c{i:05d}" for i in range(n)]
    exact = {(a, b): s for a, b, s in semantic_pairs(ids, x, 0.95, exact=True, block=8192)}
    # 200 k-means cells, each vector listed in its 2 nearest
    ann = {(a, b): s for a, b, s in semantic_pairs(ids, (x[i:i + 5000] for i in range(0, n, 5000)), 0.95,
                                                   block=4096, nlist=200)}
    assert len(exact) > 2 * len(planted_pairs)                     # natural neighbours too, not only copies
    assert {(ids[a], ids[b]) for a, b in planted_pairs} <= set(exact)
    assert set(ann) <= set(exact)                                  # scores are exact: no false pair
    recall = len(set(ann) & set(exact)) / len(exact)
    print(f"ANN recall vs exact: {recall:.4f} of {len(exact)} pairs")
    assert recall >= 0.99
    for key in list(ann)[:500]:
        assert ann[key] == pytest.approx(exact[key], abs=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for (a, b), s in list(exact.items())[:200]:
        assert s == pytest.approx(float(unit[int(a[1:])] @ unit[int(b[1:])]), abs=1e-5) and s >= 0.95


def test_semantic_pairs_by_hand():
    v = np.array([[1, 0, 0], [0.96, 0.28, 0], [0, 1, 0], [0, 0, 5], [0, 0, 0]], np.float32)
    ids = ["e", "d", "c", "b", "a"]
    got = list(semantic_pairs(ids, v, 0.95))
    assert got == [("d", "e", pytest.approx(0.96))]              # the zero vector matches nothing
    assert list(semantic_pairs(ids, v, 0.95, exact=True)) == got
    assert sorted(semantic_pairs(ids, [v[:2], v[2:]], 0.25)) == sorted(
        [("d", "e", pytest.approx(0.96)), ("c", "d", pytest.approx(0.28))])
    assert list(semantic_pairs([], np.zeros((0, 3), np.float32), 0.9)) == []


@pytest.mark.parametrize("call,match", [
    (lambda: semantic_pairs(["a", "b"], np.eye(3, dtype=np.float32), 0.9), "2 ids but 3 vectors"),
    (lambda: semantic_pairs(["a", "a"], np.eye(2, dtype=np.float32), 0.9), "not unique"),
    (lambda: semantic_pairs(["a", "b"], np.eye(2, dtype=np.float32), 1.5), "threshold"),
    (lambda: semantic_pairs(["a", "b"], np.array([[1, np.nan], [0, 1]], np.float32), 0.9), "NaN"),
    (lambda: semantic_pairs(["a", "b"], [np.eye(2, dtype=np.float32)[:1], np.ones((1, 3), np.float32)], 0.9),
     "dimension"),
])
def test_semantic_pairs_refuses_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        list(call())
