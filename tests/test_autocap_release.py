"""The released AutoCap checkpoint: a tiny random one with the released state-dict names loads strictly,
its HTS-AT and laion-CLAP compute what a reference written from the GenAU/laion sources computes, and it
captions raw audio end to end (also after `soundlake convert autocap`)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soundlake.core.errors import UserError
from soundlake.models.captioners.autocap import Autocap, meta_text, tokenize_meta
from soundlake.models.captioners.autocap_audio import (
    mel_filters,
    resample,
    sinc_resample_kernel,
    stft_kernels,
)
from soundlake.testing import make_tiny_bart

torch.set_num_threads(1)   # tiny models: intra-op threads only add synchronisation


# ---------------------------------------------------------------- front end


@pytest.mark.parametrize("sr,hop", [(32000, 320), (48000, 480)])
def test_log_mel_matches_an_independent_implementation(sr, hop):
    """torchlibrosa's front end (our conv kernels + Slaney filters) vs transformers' numpy spectrogram."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    from soundlake.models.captioners.autocap_audio import LogMel

    ref_mel = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50, max_frequency=14000,
                              sampling_rate=sr, norm="slaney", mel_scale="slaney")
    ours_mel = mel_filters(sr, 1024, 64, 50, 14000).numpy()
    np.testing.assert_allclose(ours_mel, ref_mel, atol=1e-8)
    wave = (np.random.RandomState(0).randn(sr // 2) * 0.1).astype(np.float32)
    ours = LogMel(*stft_kernels(1024), torch.from_numpy(ours_mel), hop)(torch.from_numpy(wave)[None])[0, 0].numpy()
    ref = spectrogram(wave.astype(np.float64), window_function(1024, "hann"), frame_length=1024, hop_length=hop,
                      power=2.0, center=True, pad_mode="reflect", mel_filters=ref_mel, log_mel="dB", reference=1.0,
                      min_value=1e-10, db_range=None).T
    assert ours.shape == ref.shape == (len(wave) // hop + 1, 64)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_resampler_keeps_a_tone_and_its_length():
    kernel, width = sinc_resample_kernel(32000, 48000)
    assert tuple(kernel.shape) == (3, 1, 2 * width + 2) and width == 7
    t = torch.arange(32000, dtype=torch.float64) / 32000
    out = resample(torch.sin(2 * math.pi * 1000 * t).float()[None], kernel, 32000, 48000)[0]
    assert out.shape == (48000,)
    expect = torch.sin(2 * math.pi * 1000 * torch.arange(48000, dtype=torch.float64) / 48000).float()
    torch.testing.assert_close(out[100:-100], expect[100:-100], atol=2e-3, rtol=0)


# ---------------------------------------------------------------- a tiny released checkpoint

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
  embed_dim: 16
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
  n_fft: 1024
  hop_length: 320
  f_min: 50
  f_max: 14000
  n_mels: 64
  max_length: 10
  mono: True
audio_encoder_args:
  model_arch: "transformer"
  model_name: "htsat"
text_decoder_args:
  name: "facebook/bart-base"
  pretrained: true
""" % RELEASED_TAGS
HEADS, DEPTHS = [4, 8, 16, 32], [2, 2, 2, 2]


def _rnd(*shape, std=0.2):
    return torch.randn(*shape) * std


def _relative_index(w):
    """htsat.py's WindowAttention.relative_position_index."""
    coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += w - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def _shift_mask(res, w, s):
    """htsat.py's SwinTransformerBlock attn_mask (the three-slice construction)."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for h in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for v in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, h, v, :] = cnt
            cnt += 1
    win = img.view(1, res // w, w, res // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w)
    mask = win[:, None] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _htsat_state(embed):
    """An HTS-AT body with htsat.py's names (GenAU and laion-clap share them), 527 AudioSet classes."""
    t = {"bn0.weight": 1 + _rnd(64), "bn0.bias": _rnd(64), "bn0.running_mean": _rnd(64, std=3),
         "bn0.running_var": 1 + torch.rand(64), "bn0.num_batches_tracked": torch.tensor(100),
         "patch_embed.proj.weight": _rnd(embed, 1, 4, 4), "patch_embed.proj.bias": _rnd(embed),
         "patch_embed.norm.weight": 1 + _rnd(embed), "patch_embed.norm.bias": _rnd(embed)}
    res = 64
    for i, depth in enumerate(DEPTHS):
        dim, w = embed * 2 ** i, min(8, res)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            t.update({b + "norm1.weight": 1 + _rnd(dim), b + "norm1.bias": _rnd(dim),
                      b + "attn.relative_position_bias_table": _rnd((2 * w - 1) ** 2, HEADS[i]),
                      b + "attn.relative_position_index": _relative_index(w),
                      b + "attn.qkv.weight": _rnd(3 * dim, dim), b + "attn.qkv.bias": _rnd(3 * dim),
                      b + "attn.proj.weight": _rnd(dim, dim), b + "attn.proj.bias": _rnd(dim),
                      b + "norm2.weight": 1 + _rnd(dim), b + "norm2.bias": _rnd(dim),
                      b + "mlp.fc1.weight": _rnd(4 * dim, dim), b + "mlp.fc1.bias": _rnd(4 * dim),
                      b + "mlp.fc2.weight": _rnd(dim, 4 * dim), b + "mlp.fc2.bias": _rnd(dim)})
            if j % 2 and res > w:
                t[b + "attn_mask"] = _shift_mask(res, w, w // 2)
        if i < len(DEPTHS) - 1:
            t.update({f"layers.{i}.downsample.reduction.weight": _rnd(2 * dim, 4 * dim),
                      f"layers.{i}.downsample.norm.weight": 1 + _rnd(4 * dim),
                      f"layers.{i}.downsample.norm.bias": _rnd(4 * dim)})
            res //= 2
    final = embed * 2 ** (len(DEPTHS) - 1)
    t.update({"norm.weight": 1 + _rnd(final), "norm.bias": _rnd(final), "tscam_conv.weight": _rnd(527, final, 2, 3),
              "tscam_conv.bias": _rnd(527), "head.weight": _rnd(527, 527), "head.bias": _rnd(527)})
    return t


def _released_state(bart_dir, q_dim=16, nq=6, clap_dim=16, embed=8):
    """A tiny checkpoint with the released AutoCap's state-dict names (read from the GenAU and laion-clap sources).

    BART and RoBERTa come from transformers and the Q-Former from transformers' Blip2QFormerModel (a port
    of the same LAVIS Q-Former) with its names rewritten to LAVIS's, so the mapping is checked against
    independent implementations, not against itself.
    """
    from transformers import (
        BartForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2QFormerModel,
        RobertaConfig,
        RobertaModel,
    )

    torch.manual_seed(1)
    bart = BartForConditionalGeneration.from_pretrained(bart_dir)
    d = bart.config.d_model
    qf = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=q_dim, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=48, cross_attention_frequency=1,
                                              encoder_hidden_size=d, layer_norm_eps=1e-12)).eval()
    with torch.no_grad():
        for p in qf.parameters():
            p.normal_(0, 0.2)
    state = {"decoder." + k: v.clone() for k, v in bart.state_dict().items()}
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
    final = embed * 2 ** (len(DEPTHS) - 1)
    state.update({
        "audio_query_tokens": _rnd(1, nq, q_dim), "audio_position_embedding.weight": _rnd(1024, d),
        "audio_Qfromer_layernorm_embedding.weight": 1 + _rnd(d), "audio_Qfromer_layernorm_embedding.bias": _rnd(d),
        "audio_qformer_proj.weight": _rnd(d, q_dim), "audio_qformer_proj.bias": _rnd(d),
        "enc_to_dec_proj.weight": _rnd(d, final), "enc_to_dec_proj.bias": _rnd(d),
        "clap_proj.weight": _rnd(d, clap_dim), "clap_proj.bias": _rnd(d),
        "clap_layernorm.weight": 1 + _rnd(d), "clap_layernorm.bias": _rnd(d),
        "special_tokens_embed.special_token_embed.weight": _rnd(len(RELEASED_TAGS), d),
        "audio_clap_resampler.kernel": sinc_resample_kernel(32000, 48000)[0],
    })
    # AutoCap's HTS-AT (encoder.audio_enc.*) with its torchlibrosa front end (audio_feats_extractor)
    real, imag = stft_kernels(1024)
    front = {"audio_feats_extractor.mel_trans.stft.conv_real.weight": real,
             "audio_feats_extractor.mel_trans.stft.conv_imag.weight": imag,
             "audio_feats_extractor.log_trans.melW": mel_filters(32000, 1024, 64, 50, 14000)}
    state.update({"encoder.audio_enc." + k: v for k, v in {**front, **_htsat_state(embed)}.items()})
    # laion-clap (clap_model.model.*): HTSAT audio branch at 48 kHz, RoBERTa text branch, projections, MLP heads
    c = "clap_model.model."
    state.update({c + "audio_branch." + k: v for k, v in _htsat_state(embed).items()})
    state.update({c + "audio_branch.spectrogram_extractor.stft.conv_real.weight": real,
                  c + "audio_branch.spectrogram_extractor.stft.conv_imag.weight": imag,
                  c + "audio_branch.logmel_extractor.melW": mel_filters(48000, 1024, 64, 50, 14000)})
    roberta = RobertaModel(RobertaConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                         intermediate_size=96, max_position_embeddings=40, type_vocab_size=1))
    state.update({c + "text_branch." + k: v.clone() for k, v in roberta.state_dict().items()})
    state[c + "text_branch.embeddings.position_ids"] = torch.arange(40)[None]   # older transformers stored it
    for side, width in (("audio", final), ("text", 64)):
        state.update({f"{c}{side}_projection.0.weight": _rnd(clap_dim, width), f"{c}{side}_projection.0.bias": _rnd(clap_dim),
                      f"{c}{side}_projection.2.weight": _rnd(clap_dim, clap_dim), f"{c}{side}_projection.2.bias": _rnd(clap_dim),
                      f"{c}{side}_transform.sequential.0.weight": _rnd(clap_dim, clap_dim),
                      f"{c}{side}_transform.sequential.0.bias": _rnd(clap_dim),
                      f"{c}{side}_transform.sequential.3.weight": _rnd(clap_dim, clap_dim),
                      f"{c}{side}_transform.sequential.3.bias": _rnd(clap_dim)})
    state.update({c + "logit_scale_a": torch.tensor(2.6), c + "logit_scale_t": torch.tensor(2.7)})
    return state, qf


def _htsat_reference(t, mel):
    """HTS-AT's forward as htsat.py writes it, on the checkpoint's own tensors: (fine-grained frames, pooled)."""
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"])

    b = mel.shape[0]
    x = F.batch_norm(mel.transpose(1, 3), t["bn0.running_mean"], t["bn0.running_var"], t["bn0.weight"],
                     t["bn0.bias"], False, 0.0, 1e-5).transpose(1, 3)
    x = F.interpolate(x, (1024, 64), mode="bicubic", align_corners=True)          # reshape_wav2img
    x = x.permute(0, 1, 3, 2).reshape(b, 1, 64, 4, 256).permute(0, 1, 3, 2, 4).reshape(b, 1, 256, 256)
    x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=4).flatten(2).transpose(1, 2)
    x = ln(x, "patch_embed.norm")
    res = 64
    for i, depth in enumerate(DEPTHS):
        c, heads, w = x.shape[-1], HEADS[i], min(8, res)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shift = w // 2 if j % 2 and res > w else 0
            h = ln(x, p + "norm1").view(b, res, res, c)
            h = torch.roll(h, (-shift, -shift), (1, 2))
            win = h.view(b, res // w, w, res // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
            n = win.shape[1]
            qkv = (win @ t[p + "attn.qkv.weight"].T + t[p + "attn.qkv.bias"]).reshape(-1, n, 3, heads, c // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            a = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
            rel = t[p + "attn.relative_position_bias_table"][t[p + "attn.relative_position_index"].view(-1)]
            a = a + rel.view(n, n, -1).permute(2, 0, 1)[None]
            if shift:
                mask = t[p + "attn_mask"]
                a = (a.view(-1, mask.shape[0], heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
            o = (a.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c) @ t[p + "attn.proj.weight"].T + t[p + "attn.proj.bias"]
            o = o.view(b, res // w, res // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, res, res, c)
            x = x + torch.roll(o, (shift, shift), (1, 2)).reshape(b, res * res, c)
            hid = F.gelu(ln(x, p + "norm2") @ t[p + "mlp.fc1.weight"].T + t[p + "mlp.fc1.bias"])
            x = x + hid @ t[p + "mlp.fc2.weight"].T + t[p + "mlp.fc2.bias"]
        if i < len(DEPTHS) - 1:                                                      # PatchMerging
            g = x.view(b, res, res, c)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            x = ln(g.view(b, -1, 4 * c), f"layers.{i}.downsample.norm") @ t[f"layers.{i}.downsample.reduction.weight"].T
            res //= 2
    x = ln(x, "norm")
    c = x.shape[-1]
    x = x.permute(0, 2, 1).reshape(b, c, 8, 8).reshape(b, c, 4, 2, 8).permute(0, 1, 3, 2, 4).reshape(b, c, 2, 32)
    fine = x.mean(2).permute(0, 2, 1)                                                # fine_grained_embedding
    return fine[:, :, None].repeat(1, 1, 32, 1).reshape(b, 1024, c), x.flatten(2).mean(-1)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("released")
    bart_dir = make_tiny_bart(tmp / "bart-base")
    state, qf = _released_state(bart_dir)
    ckpt = tmp / "autocap-full.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.1.3"}, ckpt)
    (tmp / "autocap-full.yaml").write_text(YAML)
    return tmp, bart_dir, state, qf, ckpt


def _clips():
    rng = np.random.RandomState(3)
    t = np.arange(32000 * 4) / 32000
    return [(0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.randn(len(t))).astype(np.float32),
            (0.2 * rng.randn(32000 * 12)).astype(np.float32),                 # longer than the window: cut
            (0.1 * np.sign(np.sin(2 * np.pi * 3 * t[:16000]))).astype(np.float32)]


def test_released_checkpoint_loads_every_tensor_and_captions_raw_audio(released, soundlake_here):
    from soundlake.models.captioners.autocap_release import load_released

    tmp, bart_dir, state, qf, ckpt = released
    model, report = load_released(ckpt, tmp / "autocap-full.yaml", bart=bart_dir)
    audio = model.audio
    ours = {**model.net.state_dict(), **audio.state_dict()}
    assert not set(model.net.state_dict()) & set(audio.state_dict())
    # every checkpoint tensor is placed, split (qkv), or checked with a reason, exactly once
    groups = [set(report.mapped), set(report.split), set(report.checked)]
    assert set.union(*groups) == set(state) and sum(map(len, groups)) == len(state)
    # every tensor of ours comes from the checkpoint, but the index constants the checkpoint does not store
    assert report.placed() | set(report.constants) == set(ours) and not report.placed() & set(report.constants)
    assert all(k.endswith(("relative_position_index", "token_type_ids")) for k in report.constants)
    for theirs, mine in report.mapped.items():
        assert torch.equal(ours[mine], state[theirs].to(ours[mine].dtype)), theirs
    for theirs, mine in report.split.items():
        assert torch.equal(torch.cat([ours[k] for k in mine]), state[theirs]), theirs
    assert report.split["encoder.audio_enc.layers.2.blocks.1.attn.qkv.weight"] == tuple(
        f"htsat.audio_encoder.layers.2.blocks.1.attention.self.{p}.weight" for p in ("query", "key", "value"))
    assert report.mapped["clap_model.model.audio_projection.2.bias"] == "clap.audio_projection.linear2.bias"
    assert report.mapped["encoder.audio_enc.audio_feats_extractor.log_trans.melW"] == "htsat_mel.mel"
    assert "classification head" in report.checked["encoder.audio_enc.tscam_conv.weight"]
    assert "mask" in report.checked["clap_model.model.audio_branch.layers.0.blocks.1.attn_mask"]
    assert "training-only" in report.checked["clap_model.model.text_transform.sequential.3.weight"]
    assert report.mapped["audio_query_tokens"] == "qformer.queries"

    # HTS-AT and the CLAP audio tower compute what htsat.py computes on the checkpoint's tensors
    clips = _clips()
    wave = torch.from_numpy(np.stack([audio._window(c) for c in clips]))
    assert wave.shape == (3, 320000) and abs(float(wave[0].abs().max()) - 0.5) < 1e-6
    enc = {k[len("encoder.audio_enc."):]: v for k, v in state.items() if k.startswith("encoder.audio_enc.")}
    lab = {k[len("clap_model.model.audio_branch."):]: v for k, v in state.items()
           if k.startswith("clap_model.model.audio_branch.")}
    with torch.no_grad():
        frames, emb = audio(clips)
        ref_frames, _ = _htsat_reference(enc, audio.htsat_mel(wave))
        wave48 = resample(wave, state["audio_clap_resampler.kernel"], 32000, 48000)
        _, pooled = _htsat_reference(lab, audio.clap_mel(wave48))
        c = "clap_model.model.audio_projection."
        ref_emb = F.normalize(F.relu(pooled @ state[c + "0.weight"].T + state[c + "0.bias"]) @ state[c + "2.weight"].T
                              + state[c + "2.bias"], dim=-1)
    assert frames.shape == (3, 1024, 64) and emb.shape == (3, 16) and wave48.shape == (3, 480000)
    torch.testing.assert_close(frames, ref_frames, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(emb, ref_emb, atol=2e-5, rtol=1e-4)
    assert torch.equal(frames[:, 0], frames[:, 31]) and not torch.equal(frames[:, 31], frames[:, 32])

    # The Q-Former computes what the reference implementation computes on the same weights.
    net = model.net.eval()
    with torch.no_grad():
        x = net.frame_proj(frames[:2])
        ctx = F.layer_norm(x + state["audio_position_embedding.weight"][:1024], (x.shape[-1],),
                           state["audio_Qfromer_layernorm_embedding.weight"],
                           state["audio_Qfromer_layernorm_embedding.bias"])
        ref = qf(query_embeds=state["audio_query_tokens"].expand(2, -1, -1), encoder_hidden_states=ctx)[0]
        ref = ref @ state["audio_qformer_proj.weight"].T + state["audio_qformer_proj.bias"]
        torch.testing.assert_close(net.qformer(x), ref, atol=1e-5, rtol=1e-4)

    # The encoder input in GenAU's order (forward_decoder: [bos] audio metadata, the CLAP token after the encoder).
    assert model.cfg.input_order == "genau" and model.net.audio_tags is None
    # Metadata as AutoCap writes it (meta_keys video_caption and title, in AutoCap's order), tag ids after BART's vocabulary.
    assert meta_text({"title": "Dog park", "video_caption": "a dog runs"}, model.cfg) == \
        "<HQVC> a dog runs </HQVC> \n <TITLE> Dog park </TITLE>"
    ids, _ = tokenize_meta(model.tokenizer, ["<HQVC>  </HQVC> \n <TITLE>  </TITLE>"], 16)
    base = model.net.base_vocab
    ids = ids[0].tolist()   # byte-level BPE keeps the spaces between tags as tokens, as AutoCap's tokenizer does
    assert [i for i in ids if i >= base] == [base + 0, base + 1, base + 4, base + 5]

    # raw audio in, one caption per clip; deterministic and independent of the batch
    metas = [{"title": "Dog park"}, None, {"video_caption": "a man taps"}]
    texts = model.caption(clips, metas)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert model.caption(clips, metas) == texts
    assert model.caption(clips[2:], metas[2:]) == texts[2:]
    assert model.sample_rate == 32000 and "split into query/key/value" in report.summary()

    # `soundlake convert autocap` writes a folder caption.autocap_model loads; it captions the same
    out = tmp / "autocap-released"
    run = soundlake_here("convert", "autocap", "--ckpt", ckpt, "--yaml", tmp / "autocap-full.yaml", "--bart", bart_dir,
                         "--out", out, env={"COLUMNS": "400"})  # lines unwrapped
    assert run.exit_code == 0, run.output
    assert "tensors loaded" in run.output and f"caption.autocap_model={out}" in run.output
    loaded = Autocap.load(out)
    assert loaded.caption(clips, metas) == texts
    from soundlake.stages.autocap import autocap_identity

    assert autocap_identity(str(out), True) == (str(out), loaded.model_hash, "autocap-tags-v1")


def test_released_checkpoint_errors_are_one_line(released, tmp_path):
    from soundlake.models.captioners.autocap_release import load_released

    _, bart_dir, state, _, ckpt = released
    (tmp_path / "a.yaml").write_text(YAML)
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="not an AutoCap checkpoint"):
        load_released(tmp_path / "bad.ckpt", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="not an AutoCap settings file"):
        load_released(tmp_path / "bad.ckpt", tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text(YAML.replace("f_max: 14000", "f_max: 8000"))
    with pytest.raises(UserError, match=r"log_trans.melW: not the Slaney mel filterbank .*8000"):
        load_released(ckpt, tmp_path / "c.yaml", bart=bart_dir)
    no_encoder = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    torch.save({"state_dict": no_encoder}, tmp_path / "no_encoder.ckpt")
    with pytest.raises(UserError, match="no encoder.audio_enc.audio_feats_extractor"):
        load_released(tmp_path / "no_encoder.ckpt", tmp_path / "a.yaml", bart=bart_dir)
    with pytest.raises(UserError, match="--bart"):
        load_released(ckpt, tmp_path / "a.yaml", bart=tmp_path / "nowhere")
