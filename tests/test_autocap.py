"""autocap: two-phase training, saving and loading, the curate stage (the released checkpoint: test_autocap_release)."""
from __future__ import annotations

import io

import pyarrow as pa
import pytest
import soundfile as sf
import torch

from soundlake.catalog.sql import fetchall
from soundlake.core.errors import UserError
from soundlake.models.captioners.autocap import Autocap, meta_text
from soundlake.models.captioners.autocap_train import (
    AutocapTrainConfig,
    CaptionItem,
    set_phase,
    train_autocap,
)
from soundlake.sources.synth import synth_clip
from soundlake.testing import (
    make_tiny_autocap,
    make_tiny_inhouse_clap,
    tiny_autocap_config,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (and crawl on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    return make_tiny_inhouse_clap(tmp_path_factory.mktemp("clap") / "clap")


def _items(n: int, start: int = 0) -> list[CaptionItem]:
    out = []
    for i in range(start, start + n):
        scene, audio = synth_clip(3, i, duration=2.0, sample_rate=16000)
        out.append(CaptionItem(audio, scene.caption, {"labels": scene.labels, "title": f"clip {i}"}))
    return out


def test_two_phase_training_loss_falls_and_folder_loads(tiny_clap, tmp_path):
    items = _items(12)
    rows = []
    res = train_autocap(items, tmp_path / "ac", tiny_autocap_config(),
                        AutocapTrainConfig(bart_epochs=3, phase1_epochs=2, phase2_epochs=14, batch_size=4,
                                           lr_bart=1e-2, lr_phase1=1e-2, lr_phase2=1e-2, warmup_steps=1, val_clips=4),
                        clap=tiny_clap, val=_items(4, 100), progress=rows.append)
    bart = [r["bart_loss"] for r in rows if "bart_loss" in r]
    rows = [r for r in rows if "phase" in r]
    losses = [r["loss"] for r in rows]
    assert len(bart) == 3 and bart[-1] < bart[0]                 # the from-config BART's denoising pretraining
    assert [r["phase"] for r in rows] == [1] * 2 + [2] * 14
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < 0.9 * losses[2], losses
    assert rows[2]["trainable"] > rows[0]["trainable"]           # BART joins in phase 2
    assert {"val_loss", "val_bleu_4", "val_cider_d"} <= set(rows[-1])

    # The folder loads back to the same weights and captions the same way.
    model = Autocap.load(tmp_path / "ac")
    trained = res["model"]
    for (k, a), (k2, b) in zip(trained.net.state_dict().items(), model.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    clips, metas = [it.audio for it in items[:3]], [it.meta for it in items[:3]]
    texts = model.caption(clips, metas)
    assert texts == trained.caption(clips, metas) and all(isinstance(t, str) for t in texts)
    assert (tmp_path / "ac" / "clap" / "soundlake_clap.json").is_file() and len(model.model_hash) == 16


def test_phases_freeze_the_right_parameters(tiny_clap, tmp_path):
    model = Autocap.load(make_tiny_autocap(tmp_path / "ac", tiny_clap, ["a bell rings", "a beep sounds"]))
    net = model.net
    set_phase(net, 1)
    phase1 = {n for n, p in net.named_parameters() if p.requires_grad}
    assert phase1 and all(n.split(".")[0] in {"frame_proj", "qformer", "tag_embed", "clap_proj", "clap_norm"}
                          for n in phase1)
    assert {"qformer.queries", "tag_embed.weight", "clap_proj.weight", "frame_proj.weight"} <= phase1
    set_phase(net, 2)
    phase2 = {n for n, p in net.named_parameters() if p.requires_grad}
    bart = phase2 - phase1
    assert any(n.startswith("bart.model.decoder.layers.") for n in bart)
    assert any(n.startswith("bart.model.encoder.layers.") for n in bart)
    assert phase1 <= phase2 and not net.bart.get_input_embeddings().weight.requires_grad
    assert not net.bart.lm_head.weight.requires_grad               # tied to the token embeddings
    with pytest.raises(ValueError):
        set_phase(net, 3)


def test_metadata_fields_keep_empty_tags():
    cfg = tiny_autocap_config()
    text = meta_text({"title": "Rain on a tin roof", "labels": ["rain", "white_noise"]}, cfg)
    assert text == ("<TITLE> Rain on a tin roof </TITLE> \n <HQVC>  </HQVC> \n <DESC>  </DESC> \n "
                    "<LABELS> rain, white noise </LABELS>")
    dropped = meta_text({"title": "Rain", "labels": ["rain"]}, cfg, drop={"title"})
    assert dropped.startswith("<TITLE>  </TITLE>") and "<LABELS> rain </LABELS>" in dropped
    assert meta_text({"tags": ["dog", "bark"]}, cfg).endswith("<LABELS> dog, bark </LABELS>")   # tags as labels


# ---------------------------------------------------------------- the curate stage

def test_curate_with_autocap_writes_caption_rows_and_resumes(ray_session, tiny_clap, tmp_path):
    from soundlake.pipelines.runner import run_pipeline
    from soundlake.pipelines.spec import load_spec

    model_dir = make_tiny_autocap(tmp_path / "autocap", tiny_clap, [it.caption for it in _items(8)])
    lake = str(tmp_path / "lake")
    sets = ["source.count=6", "source.duration=2.0", "segment.window=2.0", "stages=[segment,caption]",
            "caption.captioners=[template,autocap]", f"caption.autocap_model={model_dir}",
            "caption.autocap_batch_size=4", f"ray.address={ray_session}"]
    first = run_pipeline(load_spec("demo", sets=sets), lake)
    assert first.clips == 6
    rows = fetchall(lake, """SELECT captioner, model_id, model_hash, prompt_version, count(DISTINCT clip_id), count(*)
                             FROM captions WHERE captioner IN ('template', 'autocap') GROUP BY ALL ORDER BY 1""")
    model = Autocap.load(model_dir)
    assert rows == [("autocap", str(model_dir), model.model_hash, "autocap-tags-v1", 6, 6),
                    ("template", "template", None, "template-v1", 6, 6)]

    # Re-running adds nothing; without metadata, the existing clips get captions of the other prompt version.
    assert not run_pipeline(load_spec("demo", sets=sets), lake).rows
    third = run_pipeline(load_spec("demo", sets=sets + ["caption.use_metadata=false"]), lake)
    assert third.rows == {"captions": 6}
    assert fetchall(lake, "SELECT count(*) FROM captions WHERE prompt_version = 'autocap-tags-v1-nometa'") == [(6,)]

    # The stored caption is the model's caption for that clip and its metadata.
    from soundlake.core import audio as audio_io
    from soundlake.stages.autocap import clip_meta

    clip_id, flac, text = fetchall(lake, """SELECT a.clip_id, a.flac, k.text FROM audio a JOIN captions k USING (clip_id)
                                           WHERE k.prompt_version = 'autocap-tags-v1' ORDER BY 1 LIMIT 1""")[0]
    meta = fetchall(lake, f"SELECT title, description, labels, tags, meta_json FROM clips WHERE clip_id = '{clip_id}'")[0]
    audio, sr = audio_io.decode_flac(flac)
    expect = model.caption([audio_io.resample(audio, sr, model.sample_rate)[:, 0]],
                           [clip_meta(dict(zip(["title", "description", "labels", "tags", "meta_json"], meta)))])
    assert text == expect[0]


def test_autocap_stage_survives_a_corrupt_row(tiny_clap, tmp_path):
    from soundlake.stages.autocap import AutocapCaptionStage

    model_dir = make_tiny_autocap(tmp_path / "autocap", tiny_clap, ["a bell rings", "a beep sounds"])
    buf = io.BytesIO()
    sf.write(buf, synth_clip(3, 0, 2.0, 16000)[1], 16000, format="FLAC")
    batch = pa.Table.from_pylist([
        {"clip_id": "synth:a:0", "source": "synth", "source_id": "a", "status": "ok", "flac": buf.getvalue(),
         "title": None, "description": None, "labels": ["bell"], "tags": None, "meta_json": None},
        {"clip_id": "synth:b:0", "source": "synth", "source_id": "b", "status": "ok", "flac": b"fLaC not really",
         "title": None, "description": None, "labels": None, "tags": None, "meta_json": "{not json"},
        {"clip_id": "synth:c:0", "source": "synth", "source_id": "c", "status": "failed", "flac": None,
         "title": None, "description": None, "labels": None, "tags": None, "meta_json": None},
    ])
    stage = AutocapCaptionStage(str(model_dir), "run1", batch_size=2)
    stage.setup()
    out = stage.process(batch)
    caps = out["new_captions"].to_pylist()
    assert len(caps[0]) == 1 and caps[0][0]["captioner"] == "autocap" and caps[1] == [] and caps[2] == []
    tables = stage.tables(out)
    assert tables["captions"].num_rows == 1
    fail = tables["failures"].to_pylist()
    assert [(f["clip_id"], f["stage"], f["error"]) for f in fail] == [("synth:b:0", "autocap", "corrupt")]


def test_spec_needs_a_model_for_autocap():
    from soundlake.pipelines.spec import load_spec

    with pytest.raises(UserError, match="caption.autocap_model: the autocap captioner needs a model folder"):
        load_spec("demo", sets=["caption.captioners=[template,autocap]"])
    with pytest.raises(UserError, match="caption.captioners"):
        load_spec("demo", sets=["caption.captioners=[nope]"])


@pytest.mark.parametrize("order", ["eq3", "genau"])
def test_encoder_input_follows_eq3_or_genaus_code_token_by_token(order):
    """Eq. 3: x_clap [boa] x_audio [eoa] then the tagged metadata, all into the BART encoder.
    GenAU's code (the released checkpoint): [bos] x_audio metadata into the encoder, the CLAP
    token joined in front of its output."""
    from soundlake.models.captioners.autocap import (
        AutocapNet,
        add_tags,
        build_tokenizer,
        new_bart,
    )

    cfg = tiny_autocap_config(frame_dim=8, clap_dim=6, input_order=order)
    tok = build_tokenizer(cfg, ["a dog barks", "rain falls on a roof"])
    base = add_tags(tok, cfg)
    torch.manual_seed(0)
    net = AutocapNet(cfg, new_bart(cfg, tok, base), base).eval()
    frames, clap = torch.randn(2, 10, 8), torch.randn(2, 6)
    enc = tok([meta_text({"title": "dog", "labels": ["Dog"]}, cfg)] * 2, return_tensors="pt", padding=True)
    meta_ids, meta_mask = enc["input_ids"], enc["attention_mask"]
    seen = {}
    net.bart.model.encoder.register_forward_hook(lambda m, a, kw, out: seen.update(kw, out=out.last_hidden_state),
                                                 with_kwargs=True)
    with torch.no_grad():
        h, mask = net.encode(frames, clap, meta_ids, meta_mask)
        audio = net.qformer(net.frame_proj(frames))
        clap_tok = net.clap_norm(net.clap_proj(clap))
        meta = net.token_embeds(meta_ids)
    x, q = seen["inputs_embeds"], cfg.num_queries
    if order == "eq3":
        bos_id, eos_id = net.bart.config.bos_token_id, net.bart.config.eos_token_id
        emb = net.bart.get_input_embeddings().weight
        torch.testing.assert_close(x[:, 0], clap_tok)                                 # x_clap
        torch.testing.assert_close(x[:, 1], emb[bos_id].expand(2, -1))                # [boa], started as <bos>
        torch.testing.assert_close(x[:, 2:2 + q], audio)                              # x_audio
        torch.testing.assert_close(x[:, 2 + q], emb[eos_id].expand(2, -1))            # [eoa], started as <eos>
        torch.testing.assert_close(x[:, 3 + q:], meta)                                # [bom]_i x_meta_i [eom]_i ...
        assert torch.equal(seen["attention_mask"], mask) and torch.equal(h, seen["out"])
        assert mask.shape[1] == 3 + q + meta_ids.shape[1] and bool(mask[:, :3 + q].all())
    else:
        bos = net.token_embeds(torch.full((2, 1), net.bart.config.bos_token_id))
        torch.testing.assert_close(x, torch.cat([bos, audio, meta], 1))
        torch.testing.assert_close(h[:, 0], clap_tok)                                 # after the encoder
        torch.testing.assert_close(h[:, 1:], seen["out"])
