"""`soundlake calibrate-cache` and `soundlake evaluate --model`, end to end on a tiny random
DiT bundle saved and loaded through the real model-folder path (training.bundle).

The AudioCache / LiteFocus / metric cores are tested in test_cached_inference.py and
test_metrics.py (δ = 0 and caching off identical to the plain sampler, constant layers
reused, model unchanged, sparse r = 1 exact, FD/KL/IS/CLAP hand-checked); here: the
Eq. 2 planner, the prompt files, the profile written by one command and read by the
other, and the report's rows and counts.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn
from typer.testing import CliRunner

from soundlake.cli import app
from soundlake.core.errors import UserError
from soundlake.generation.diffusion import model_calls
from soundlake.generation.inference import evaluate
from soundlake.generation.inference.audiocache import (
    AudioCache,
    CacheProfile,
    layer_names,
    plan_refreshes,
    profile_path,
)
from soundlake.generation.inference.evaluate import Sampling, load_profile, read_prompts
from soundlake.generation.inference.hooks import HOOK_ATTR
from soundlake.generation.model_folder import Generator
from soundlake.testing import make_tiny_generator, make_tiny_inhouse_clap

torch.set_num_threads(1)
STEPS = 6
CAPTIONS = ["a dog barks", "rain on a tin roof", "a siren wails"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-eval")
    return make_tiny_generator(root / "dit", train_seconds=0.5), make_tiny_inhouse_clap(root / "clap")


def hook_free(model):
    """No module, the attention cores (plain attributes, not children) included, carries a
    hook registry or a forward of its own."""
    mods = list(model.modules())
    mods += [m.attention for m in mods if isinstance(getattr(m, "attention", None), nn.Module)]
    return all(not ({"forward", HOOK_ATTR} & m.__dict__.keys())
               and m.forward.__func__ is type(m).forward for m in mods)


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, " ".join(res.output.split())  # undo rich's wrapping at 80 columns


def test_plan_refreshes_follows_eq2():
    rates = np.array([[0.0, 0.2, 0.2, 0.2, 0.2, 0.2],     # reaches 0.3 every other step
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # constant: only first and last
                      [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]])    # always above delta
    plan = plan_refreshes(rates, 0.3)
    assert plan.tolist() == [[True, False, True, False, True, True],
                             [True, False, False, False, False, True],
                             [True] * 6]
    assert plan_refreshes(rates, 0.3, max_reuse=1)[1].tolist() == [True, False, True, False, True, True]
    assert plan_refreshes(rates, 0.0).all()


def test_read_prompts(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(800, np.float32), 16000)
    (tmp_path / "p.jsonl").write_text('{"caption": "a dog barks", "audio": "a.wav"}\n\n# note\n'
                                      '{"text": "rain", "reference": "a.wav"}\n')
    ps = read_prompts(tmp_path / "p.jsonl")
    assert [p.caption for p in ps] == ["a dog barks", "rain"] and ps[0].reference == tmp_path / "a.wav"
    (tmp_path / "p.txt").write_text("a dog barks\n  rain on a roof \n")
    assert [(p.caption, p.reference) for p in read_prompts(tmp_path / "p.txt")] == [
        ("a dog barks", None), ("rain on a roof", None)]
    bad = {'{"caption": "x"\n': r"p\.jsonl:1: not valid JSON",
           '{"audio": "a.wav"}\n': r":1: no \"caption\"",
           'a\n{"caption": "x", "audio": "missing.wav"}\n': r":2: reference audio .*missing\.wav not found",
           '{"caption": "x", "audio": "a.wav"}\n{"caption": "y"}\n': "1 of 2 prompts have reference audio",
           "\n# only a comment\n": "no prompts"}
    for text, match in bad.items():
        (tmp_path / "p.jsonl").write_text(text)
        with pytest.raises(UserError, match=match):
            read_prompts(tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="no such file"):
        read_prompts(tmp_path / "nope.jsonl")


def test_calibrate_then_evaluate_report(models, tmp_path):
    """calibrate-cache writes the profile + plot; evaluate loads it (no recalibration), runs
    uncached and each δ on two batches, and its rows' layer counts equal AudioCache.stats()
    of the same runs made here, and the Eq. 2 plan made before running."""
    dit, clap = models
    (tmp_path / "p.txt").write_text("\n".join(CAPTIONS) + "\n")
    code, out = cli("calibrate-cache", "--model", dit, "--prompts", tmp_path / "p.txt", "--steps", STEPS, "-q")
    assert code == 0, out
    path = profile_path(dit, "ddim", STEPS)
    prof = CacheProfile.load(path)
    assert prof.num_prompts == 3 and prof.steps == STEPS and prof.meta["seconds"] == 0.5
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "planned cut" in out and "self_attn" in out
    mtime = path.stat().st_mtime_ns

    (tmp_path / "labels.txt").write_text("dog\nrain\nsiren\n")
    deltas = [0.0, 0.01, 0.05]
    code, out = cli("evaluate", "--model", dit, "--prompts", tmp_path / "p.txt", "--steps", STEPS,
                    "--cache-delta", ",".join(map(str, deltas)), "--clap", clap, "--labels", tmp_path / "labels.txt",
                    "--batch-size", 2, "--out", tmp_path / "rep", "-q")
    assert code == 0, out
    assert path.stat().st_mtime_ns == mtime  # the saved profile was used, not recalibrated
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    meta, rows = rep["meta"], rep["rows"]
    assert meta["profile"]["source"] == "loaded from beside the model" and meta["profile"]["prompts"] == 3
    assert meta["reference"].startswith("generated-uncached") and meta["reference_clips"] == 3
    assert meta["generated_sample_rate"] == 16000 and meta["clap"]["sample_rate"] == 16000
    assert [r["setting"] for r in rows] == ["uncached", "δ=0", "δ=0.01", "δ=0.05"]
    assert all(r["clips"] == 3 and r["metrics"]["fd"]["n_generated"] == 3 for r in rows)

    gen = Generator.load(dit)
    profile = load_profile(gen, Sampling(steps=STEPS))
    n_layers = len(layer_names(gen.dit))
    assert rows[0]["layer_computed"] == 2 * STEPS * n_layers and rows[0]["layer_reused"] == 0
    for d, row in zip(deltas, rows[1:]):
        computed = reused = 0
        with AudioCache(gen.dit, profile, delta=d) as cache:
            for b, batch in enumerate([CAPTIONS[:2], CAPTIONS[2:]]):
                with cache.run(STEPS):
                    gen.generate(batch, seconds=0.5, steps=STEPS, seed=b)
                computed += cache.stats()["computed"]
                reused += cache.stats()["reused"]
        assert (row["layer_computed"], row["layer_reused"]) == (computed, reused)
        planned = plan_refreshes(profile.rates_for(STEPS), d).sum() * 2  # two batches
        assert computed == planned and row["planned_fraction"] == pytest.approx(planned / (2 * STEPS * n_layers))
    assert rows[1]["layer_reused"] == 0 and rows[3]["layer_reused"] > rows[2]["layer_reused"] > 0
    # δ = 0 through the real Generator: outputs identical to the uncached ones
    assert rows[1]["fd"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows[1]["clap"] == rows[0]["clap"] and rows[3]["clap"] != rows[0]["clap"]
    assert rows[0]["latent_drift"] == rows[1]["latent_drift"] == 0.0 and rows[3]["latent_drift"] > 0
    assert rows[3]["fd_exact"] == rows[3]["fd"]  # without references, FD is against the exact outputs

    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("| δ=") == 3 and "change_rates.png" in md and "Reference set: generated-uncached" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    assert "uncached" in out and "δ=0.05" in out


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_generate_with_cache_delta_uses_the_saved_profile(models, tmp_path, sampler):
    """`generate --cache-delta` samples with AudioCache on the profile beside the model: the
    sidecar's layer counts are the Eq. 2 plan, and the audio is what the same cached run gives
    in-process; without a profile for the step count it is one line naming calibrate-cache.
    Heun's profile has one rate per step; its plan holds for both model calls of a step."""
    dit, _ = models
    (tmp_path / "p.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert cli("calibrate-cache", "--model", dit, "--prompts", tmp_path / "p.txt", "--steps", STEPS,
               "--sampler", sampler, "-q")[0] == 0
    out = tmp_path / "cached.wav"
    code, text = cli("generate", "--model", dit, CAPTIONS[0], "--seconds", 0.5, "--steps", STEPS,
                     "--sampler", sampler, "--cache-delta", 0.05, "--out", out)
    assert code == 0, text
    meta = json.loads(out.with_name(out.name + ".json").read_text())["audiocache"]
    gen = Generator.load(dit)
    profile = load_profile(gen, Sampling(steps=STEPS, sampler=sampler))
    calls = model_calls(sampler, STEPS)
    assert profile.steps == STEPS and meta["computed"] + meta["reused"] == calls * len(profile.layers)
    plan = plan_refreshes(profile.rates_for(STEPS), 0.05)
    per_step = np.full(STEPS, calls // STEPS + (sampler == "heun"))  # heun: 2 calls a step, 1 in the last
    per_step[-1] = 1
    assert meta["delta"] == 0.05 and meta["computed"] == (plan * per_step).sum()
    assert meta["reused"] > 0
    with AudioCache(gen.dit, profile, delta=0.05) as cache, cache.run(STEPS):
        res = gen.generate([CAPTIONS[0]], seconds=0.5, steps=STEPS, sampler=sampler, cfg=5.0, rescale=0.75, seed=0)
    audio, _ = sf.read(out, dtype="float32")
    np.testing.assert_allclose(audio, res.audio[0].reshape(audio.shape), atol=1e-4)
    code, text = cli("generate", "--model", dit, CAPTIONS[0], "--seconds", 0.5, "--steps", STEPS + 1,
                     "--sampler", sampler, "--cache-delta", 0.3, "--out", tmp_path / "x.wav")
    assert code != 0 and "calibrate-cache" in text and f"--steps {STEPS + 1}" in text, text


def test_evaluate_with_references_and_sparse_attention(models, tmp_path, monkeypatch):
    """Reference audio (another rate, resampled and recorded), calibration on the fly when
    no profile fits, and full vs sparse attention rows at two durations; attention timed
    around LiteFocus too, and the model left with no hook or forward of its own."""
    dit, clap = models
    gens = []
    real = evaluate.evaluate_generation

    def spy(gen, *args, **kwargs):
        gens.append(gen)
        assert hook_free(gen.dit)
        return real(gen, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_generation", spy)
    lines = []
    for i, c in enumerate(CAPTIONS):
        t = np.arange(22050) / 22050
        sf.write(tmp_path / f"r{i}.wav", (0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t)).astype(np.float32), 22050)
        lines.append(json.dumps({"caption": c, "audio": f"r{i}.wav"}))
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    code, out = cli("evaluate", "--model", dit, "--prompts", tmp_path / "eval.jsonl", "--steps", 4,
                    "--cache-delta", "0.05", "--sparse-attention", "litefocus", "--ratio", 0.1,
                    "--durations", "0.5,2", "--sparse-with-delta", "0.05", "--clap", clap, "--labels", "audioset",
                    "--out", tmp_path / "rep", "-q")
    assert code == 0, out
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    meta, rows = rep["meta"], rep["rows"]
    assert meta["reference"] == "reference audio from the prompt file" and meta["reference_sample_rates"] == [22050]
    assert meta["profile"]["source"].startswith("calibrated now on the 3 evaluation prompts")
    assert profile_path(dit, "ddim", 4).is_file()
    assert meta["labels"]["name"] == "audioset" and meta["labels"]["count"] > 500
    assert meta["sparse"]["window_frames"] == 25  # the training length, 0.5 s at 50 frames/s
    names = [r["setting"] for r in rows]
    assert names == ["uncached", "δ=0.05", "litefocus r=0.1 0.5 s", "δ=0.05 + litefocus r=0.1 0.5 s", "full 2 s",
                     "litefocus r=0.1 2 s", "δ=0.05 + litefocus r=0.1 2 s"]
    by = dict(zip(names, rows))
    assert by["full 2 s"]["frames"] == 100
    both = by["δ=0.05 + litefocus r=0.1 2 s"]  # cache and sparse attention on one run, vs full attention at 2 s
    assert both["layer_reused"] > 0 and both["latent_drift"] > 0
    assert both["latent_drift"] != pytest.approx(by["litefocus r=0.1 2 s"]["latent_drift"], rel=1e-6)
    # the timer wraps LiteFocus's hook (which calls nothing inside it), exact or sparse
    assert all(r["attention_s"] > 0 for r in rows)
    assert len(gens) == 1 and hook_free(gens[0].dit)  # evaluation detached everything it attached
    assert by["uncached"]["fd"] > 0  # against real references, not against itself
    assert by["uncached"]["fd_exact"] == pytest.approx(0.0, abs=1e-6) and by["δ=0.05"]["latent_drift"] > 0
    # up to the training length the sparse module is exact attention
    assert by["litefocus r=0.1 0.5 s"]["clap"] == pytest.approx(by["uncached"]["clap"], abs=1e-5)
    assert by["litefocus r=0.1 2 s"]["clap"] != pytest.approx(by["full 2 s"]["clap"], abs=1e-7)
    assert "| full 2 s | 100 |" in (tmp_path / "rep" / "report.md").read_text()


def test_evaluation_adds_the_papers_extractors(models, tmp_path):
    """With PANNs and VGGish given, each row also has FD / KL / IS on CNN14 features and FAD on
    VGGish embeddings, each recorded with its extractor, rate and clip counts; the report
    names them. (Random weights: the parity with the reference packages is test_extractors.)"""
    from soundlake.generation.inference.metrics import ClapFunctions
    from soundlake.models.clap.load import load_clap
    from soundlake.models.extractors.panns import Cnn14, PannsMetrics
    from soundlake.models.extractors.vggish import VGGish, VggishMetrics

    dit, clap = models
    gen = Generator.load(dit)
    torch.manual_seed(0)
    # CNN14 with a 64-wide embedding head instead of 2048: FD's sqrtm of a 2048 x 2048 covariance
    # product alone took most of this test, and nothing here depends on the embedding's width
    # (the full-size network's outputs are checked against the reference in test_extractors).
    panns = Cnn14()
    panns.fc1, panns.fc_audioset = nn.Linear(2048, 64), nn.Linear(64, 527)
    ex = evaluate.PaperExtractors(panns=PannsMetrics(panns, "panns-random"),
                                  vggish=VggishMetrics(VGGish(), "vggish-random"))
    labels = ["dog", "rain", "siren"]
    rep = evaluate.evaluate_generation(gen, [evaluate.EvalPrompt(c) for c in CAPTIONS], Sampling(steps=2),
                                       evaluate.EvalSettings([], 1.0), ClapFunctions.of(load_clap(str(clap)), labels),
                                       ("test", labels), None, extractors=ex)
    (row,) = rep.rows
    m = row["metrics"]
    assert m["fd_panns"]["model"] == "panns-random" and m["fad_vggish"]["model"] == "vggish-random"
    assert all(m[k]["sample_rate"] == 16000 and m[k]["n_generated"] == 3 for k in ("fd_panns", "kl_panns", "fad_vggish"))
    assert m["fd_panns"]["details"]["dim"] == 64 and m["fad_vggish"]["details"]["dim"] == 128  # each its own
    # no reference audio: the reference set is the uncached outputs, so this row is 0 against itself
    assert row["kl_panns"] == pytest.approx(0.0, abs=1e-9) and row["fad_vggish"] == pytest.approx(0.0, abs=1e-3)
    assert row["is_panns"] >= 1.0
    assert rep.meta["extractors"] == {"panns": {"model": "panns-random", "sample_rate": 16000},
                                      "vggish": {"model": "vggish-random", "sample_rate": 16000}}
    md = rep.markdown(images=False)
    assert "## The papers' extractors" in md and "| uncached |" in md.split("## The papers' extractors")[1]
    (tmp_path / "p.txt").write_text("a dog barks\nrain\n")
    code, out = cli("evaluate", "--model", dit, "--prompts", tmp_path / "p.txt", "--clap", clap,
                    "--vggish-pca", tmp_path / "pca.pth")
    assert code != 0 and "--vggish-pca needs --vggish" in out


def test_cli_errors_are_one_line(models, tmp_path):
    dit, clap = models
    (tmp_path / "p.txt").write_text("a\nb\n")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav file")
    (tmp_path / "bad.jsonl").write_text('{"caption": "a", "audio": "bad.wav"}\n{"caption": "b", "audio": "bad.wav"}\n')
    (tmp_path / "labels.txt").write_text("dog\nrain\n")
    # Few steps and labels: the errors do not depend on them, and those that come after the models
    # load (and a calibration) do not wait for 100 steps or for AudioSet's 527 label embeddings.
    small = ["--steps", 2, "--labels", tmp_path / "labels.txt"]
    cases = [(["--model", dit, "--prompts", tmp_path / "bad.jsonl", "--clap", clap, *small],
              "bad.wav: cannot decode"),
             (["--model", dit, "--prompts", tmp_path / "p.txt"], "--clap PATH is needed"),
             (["--model", dit, "--prompts", tmp_path / "p.txt", "--clap", clap, "--cache-delta", "0.1,x"],
              "--cache-delta '0.1,x'"),
             (["--model", dit, "--prompts", tmp_path / "p.txt", "--clap", clap, "--sampler", "lms"],
              "--sampler 'lms'"),
             (["--model", tmp_path, "--prompts", tmp_path / "p.txt", "--clap", clap, *small],
              "not a soundlake model folder"),
             (["--model", dit, "--prompts", tmp_path / "none.txt", "--clap", clap], "no such file"),
             (["--model", dit, "--clap", clap], "give --model DIT and --prompts FILE")]
    for args, message in cases:
        res = CliRunner().invoke(app, ["evaluate", *map(str, args)])
        # the error is the last line, unwrapped (a started evaluation's progress bar may come before it)
        last = res.output.splitlines()[-1]
        assert res.exit_code == 2 and last.startswith("error:") and message in last \
            and res.output.count("error:") == 1, res.output
    code, out = cli("calibrate-cache", "--model", dit, "--prompts", tmp_path / "p.txt", "--sampler", "x")
    assert code == 2 and "--sampler 'x'" in out


def test_evaluate_group_keeps_captions_subcommand(tmp_path):
    code, out = cli("evaluate", "--help")
    assert code == 0 and "captions" in out and "--cache-delta" in out
    code, out = cli("evaluate", "captions", "--help")
    assert code == 0 and "--references" in out and "--cache-delta" not in out
    code, out = cli("evaluate", "captions", "--lake", tmp_path / "lake")
    assert code == 2 and "no lake at" in out  # the captions command ran, not the generation evaluation
