"""autocap: two-stage training, saving and loading, the released-checkpoint mapping, the curate stage."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from soundlake.catalog.sql import fetchall
from soundlake.errors import UserError
from soundlake.models.autocap import Autocap, meta_text, tokenize_meta
from soundlake.models.autocap_train import AutocapTrainConfig, CaptionItem, set_stage, train_autocap
from soundlake.stages.synth import synth_clip
from soundlake.testing import make_tiny_autocap, make_tiny_bart, make_tiny_inhouse_clap, tiny_autocap_config


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


def test_two_stage_training_loss_falls_and_folder_loads(tiny_clap, tmp_path):
    items = _items(12)
    rows = []
    res = train_autocap(items, tmp_path / "ac", tiny_autocap_config(),
                        AutocapTrainConfig(bart_epochs=3, stage1_epochs=2, stage2_epochs=14, batch_size=4,
                                           lr_bart=1e-2, lr_stage1=1e-2, lr_stage2=1e-2, warmup_steps=1, val_clips=4),
                        clap=tiny_clap, val=_items(4, 100), progress=rows.append)
    bart = [r["bart_loss"] for r in rows if "bart_loss" in r]
    rows = [r for r in rows if "stage" in r]
    losses = [r["loss"] for r in rows]
    assert len(bart) == 3 and bart[-1] < bart[0]                 # the from-config BART's denoising pretraining
    assert [r["stage"] for r in rows] == [1] * 2 + [2] * 14
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < 0.9 * losses[2], losses
    assert rows[2]["trainable"] > rows[0]["trainable"]           # BART joins in stage 2
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


def test_stages_freeze_the_right_parameters(tiny_clap, tmp_path):
    model = Autocap.load(make_tiny_autocap(tmp_path / "ac", tiny_clap, ["a bell rings", "a beep sounds"]))
    net = model.net
    set_stage(net, 1)
    stage1 = {n for n, p in net.named_parameters() if p.requires_grad}
    assert stage1 and all(n.split(".")[0] in {"frame_proj", "qformer", "tag_embed", "clap_proj", "clap_norm"}
                          for n in stage1)
    assert {"qformer.queries", "tag_embed.weight", "clap_proj.weight", "frame_proj.weight"} <= stage1
    set_stage(net, 2)
    stage2 = {n for n, p in net.named_parameters() if p.requires_grad}
    bart = stage2 - stage1
    assert any(n.startswith("bart.model.decoder.layers.") for n in bart)
    assert any(n.startswith("bart.model.encoder.layers.") for n in bart)
    assert stage1 <= stage2 and not net.bart.get_input_embeddings().weight.requires_grad
    assert not net.bart.lm_head.weight.requires_grad               # tied to the token embeddings
    with pytest.raises(ValueError):
        set_stage(net, 3)


def test_metadata_fields_keep_empty_tags():
    cfg = tiny_autocap_config()
    text = meta_text({"title": "Rain on a tin roof", "labels": ["rain", "white_noise"]}, cfg)
    assert text == ("<TITLE> Rain on a tin roof </TITLE> \n <HQVC>  </HQVC> \n <DESC>  </DESC> \n "
                    "<LABELS> rain, white noise </LABELS>")
    dropped = meta_text({"title": "Rain", "labels": ["rain"]}, cfg, drop={"title"})
    assert dropped.startswith("<TITLE>  </TITLE>") and "<LABELS> rain </LABELS>" in dropped
    assert meta_text({"tags": ["dog", "bark"]}, cfg).endswith("<LABELS> dog, bark </LABELS>")   # tags as labels


# ---------------------------------------------------------------- the released checkpoint

RELEASED_TAGS = ["<HQVC>", "</HQVC>", "<AVC>", "</AVC>", "<TITLE>", "</TITLE>", "<DESC>", "</DESC>",
                 "<SUB>", "</SUB>", "<LBL>", "</LBL>"]
YAML = """target: !module src.models.pl_htsat_q_bart_captioning.AutoCap
variables:
  sampling_rate: &sampling_rate 32000
model:
  audio_features_dropout_p: 0.2
  text_features_dropout_p: 0.2
  use_text_qformer: false
  use_audio_qformer: true
  use_clap_embeds: true
  meta_input: true
  add_special_tokens: True
  meta_keys: ['video_caption', 'title']
meta:
  max_prompt_len : 128
clap_embeds:
  embed_dim: 20
audio_qformer:
  num_audio_query_token: 6
  frozen_audio_Qformer: false
  hidden_size: 16
  add_cross_attention: true
  num_attention_heads: 2
  num_hidden_layers: 2
tokenizer:
  max_length: 30
  special_tokens: %s
audio_args:
  sr: *sampling_rate
  max_length: 10
text_decoder_args:
  name: "facebook/bart-base"
  pretrained: true
""" % RELEASED_TAGS


def _released_state(bart_dir, frame_dim=40, q_dim=16, nq=6, clap_dim=20):
    """A tiny checkpoint with AutoCap's state-dict names (read from the GenAU sources).

    The Q-Former comes from transformers' Blip2QFormerModel (a port of the same LAVIS Q-Former)
    with its names rewritten to LAVIS's, so the mapping is checked against an independent
    implementation, not against itself.
    """
    from transformers import BartForConditionalGeneration, Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(1)
    bart = BartForConditionalGeneration.from_pretrained(bart_dir)
    d = bart.config.d_model
    qf = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=q_dim, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48, cross_attention_frequency=1,
                                              encoder_hidden_size=d, layer_norm_eps=1e-12)).eval()
    with torch.no_grad():
        for p in qf.parameters():
            p.normal_(0, 0.2)
    state = {}
    for k, v in bart.state_dict().items():
        state["decoder." + k] = v.clone()
    shared = state["decoder.model.shared.weight"]
    for k in ("decoder.lm_head.weight", "decoder.model.encoder.embed_tokens.weight",
              "decoder.model.decoder.embed_tokens.weight"):    # transformers 4.x listed every tied copy
        state[k] = shared.clone()
    for k, v in list(state.items()):
        if k.startswith("decoder.model."):
            state["special_tokens_embed.model." + k[len("decoder.model."):]] = v.clone()
    for k, v in qf.state_dict().items():
        k = k.replace("layernorm.", "bert.embeddings.LayerNorm.", 1) if k.startswith("layernorm.") else "bert." + k
        state["audio_Qformer." + k.replace(".attention.attention.", ".attention.self.")
              .replace(".crossattention.attention.", ".crossattention.self.")] = v.clone()
    state["audio_Qformer.bert.embeddings.position_ids"] = torch.arange(1024)[None]
    rnd = lambda *s: torch.randn(*s) * 0.2  # noqa: E731
    state.update({
        "audio_query_tokens": rnd(1, nq, q_dim), "audio_position_embedding.weight": rnd(130, d),
        "audio_Qfromer_layernorm_embedding.weight": 1 + rnd(d), "audio_Qfromer_layernorm_embedding.bias": rnd(d),
        "audio_qformer_proj.weight": rnd(d, q_dim), "audio_qformer_proj.bias": rnd(d),
        "enc_to_dec_proj.weight": rnd(d, frame_dim), "enc_to_dec_proj.bias": rnd(d),
        "clap_proj.weight": rnd(d, clap_dim), "clap_proj.bias": rnd(d),
        "clap_layernorm.weight": 1 + rnd(d), "clap_layernorm.bias": rnd(d),
        "special_tokens_embed.special_token_embed.weight": rnd(len(RELEASED_TAGS), d),
        # HTS-AT and laion-clap tensors (names from htsat.py / laion_clap), which soundlake does not load
        "encoder.audio_enc.spectrogram_extractor.stft.conv_real.weight": rnd(513, 1, 1024),
        "encoder.audio_enc.patch_embed.proj.weight": rnd(96, 1, 4, 4),
        "encoder.audio_enc.layers.0.blocks.0.attn.qkv.weight": rnd(288, 96),
        "clap_model.model.audio_branch.patch_embed.proj.weight": rnd(96, 1, 4, 4),
        "clap_model.model.text_branch.embeddings.word_embeddings.weight": rnd(10, 8),
    })
    return state, qf


def test_released_checkpoint_maps_every_tensor(tmp_path):
    from soundlake.models.autocap_release import load_released

    bart_dir = make_tiny_bart(tmp_path / "bart-base")
    state, qf = _released_state(bart_dir)
    ckpt = tmp_path / "autocap-full.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.1.3"}, ckpt)
    (tmp_path / "autocap-full.yaml").write_text(YAML)

    model, report = load_released(ckpt, tmp_path / "autocap-full.yaml", bart=bart_dir)
    ours = model.net.state_dict()
    # every checkpoint tensor is placed, checked as a duplicate/constant, or reported as not loaded
    not_loaded = {k for keys in report.not_loaded.values() for k in keys}
    assert set(report.mapped) | set(report.checked) | not_loaded == set(state)
    assert not (set(report.mapped) & set(report.checked)) and not (set(report.mapped) & not_loaded)
    assert not_loaded == {k for k in state if k.startswith(("encoder.", "clap_model."))}
    # every tensor of ours comes from the checkpoint (strict), with the checkpoint's values
    assert set(report.mapped.values()) == set(ours)
    for theirs, mine in report.mapped.items():
        assert torch.equal(ours[mine], state[theirs]), theirs
    assert report.mapped["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] == \
        "qformer.layers.1.cross_attn.k.weight"
    assert report.mapped["special_tokens_embed.special_token_embed.weight"] == "tag_embed.weight"

    # The Q-Former computes what the reference implementation computes on the same weights.
    net = model.net.eval()
    frames = torch.randn(2, 7, net.cfg.frame_dim)
    with torch.no_grad():
        x = net.frame_proj(frames)
        ctx = torch.nn.functional.layer_norm(x + state["audio_position_embedding.weight"][:7], (x.shape[-1],),
                                             state["audio_Qfromer_layernorm_embedding.weight"],
                                             state["audio_Qfromer_layernorm_embedding.bias"])
        ref = qf(query_embeds=state["audio_query_tokens"].expand(2, -1, -1), encoder_hidden_states=ctx)[0]
        ref = ref @ state["audio_qformer_proj.weight"].T + state["audio_qformer_proj.bias"]
        torch.testing.assert_close(net.qformer(x), ref, atol=1e-5, rtol=1e-4)

    # Metadata as AutoCap writes it (meta_keys video_caption and title, in AutoCap's order), tag ids after BART's vocabulary.
    assert meta_text({"title": "Dog park", "video_caption": "a dog runs"}, model.cfg) == \
        "<HQVC> a dog runs </HQVC> \n <TITLE> Dog park </TITLE>"
    ids, _ = tokenize_meta(model.tokenizer, ["<HQVC>  </HQVC> \n <TITLE>  </TITLE>"], 16)
    base = model.net.base_vocab
    ids = ids[0].tolist()   # byte-level BPE keeps the spaces between tags as tokens, as AutoCap's tokenizer does
    assert [i for i in ids if i >= base] == [base + 0, base + 1, base + 4, base + 5]
    assert ids[-1] == model.tokenizer.eos_token_id
    texts = model.caption_features(frames, torch.randn(2, 20), [{"title": "Dog park"}, None])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="no audio encoder"):
        model.caption([np.zeros(16000, np.float32)])
    assert "2 tensors of the laion-clap" in report.summary() and "3 tensors of the HTS-AT" in report.summary()


def test_released_checkpoint_errors_are_one_line(tmp_path):
    from soundlake.models.autocap_release import load_released

    (tmp_path / "a.yaml").write_text(YAML)
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="not an AutoCap checkpoint"):
        load_released(tmp_path / "bad.ckpt", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="not an AutoCap settings file"):
        load_released(tmp_path / "bad.ckpt", tmp_path / "b.yaml")


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
    from soundlake.stages import audio_io
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
