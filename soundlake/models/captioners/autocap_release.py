"""Loading GenAU's released AutoCap checkpoint (``autocap-full.ckpt`` + ``autocap-full.yaml``).

The names come from the public GenAU sources (``AutoCap/src/models/pl_htsat_q_bart_captioning.py``,
``AutoCap/src/modules/qformer/Qformer.py``, ``AutoCap/src/modules/audio_encoder/{htsat,audio_encoder,
feature_extractor}.py``, ``AutoCap/settings/*.yaml``) and laion-clap (``clap_module/{model,htsat}.py``):
a PyTorch Lightning checkpoint whose ``state_dict`` holds

===============================================  ===============================================
AutoCap name                                     soundlake name
===============================================  ===============================================
``decoder.*`` (BartForConditionalGeneration)     ``net.bart.*``
``enc_to_dec_proj``                              ``net.frame_proj``
``audio_query_tokens``                           ``net.qformer.queries``
``audio_Qformer.bert.embeddings.LayerNorm``      ``net.qformer.query_norm``
``audio_position_embedding``                     ``net.qformer.frame_pos``
``audio_Qfromer_layernorm_embedding``            ``net.qformer.frame_norm``  (sic: "Qfromer")
``audio_Qformer.bert.encoder.layer.i.``          ``net.qformer.layers.i.``
  ``attention.self.{query,key,value}``             ``self_attn.{q,k,v}``
  ``attention.output.dense / LayerNorm``           ``self_attn.o / self_norm``
  ``crossattention.self.{query,key,value}``        ``cross_attn.{q,k,v}``
  ``crossattention.output.dense / LayerNorm``      ``cross_attn.o / cross_norm``
  ``intermediate_query.dense``                     ``fc1``
  ``output_query.dense / LayerNorm``               ``fc2 / ffn_norm``
``audio_qformer_proj``                           ``net.qformer.out``
``clap_proj``, ``clap_layernorm``                ``net.clap_proj``, ``net.clap_norm``
``special_tokens_embed.special_token_embed``     ``net.tag_embed``
``encoder.audio_enc.`` (HTS-AT)                  ``audio.htsat.audio_encoder.`` (transformers ClapAudioModel)
  ``audio_feats_extractor.mel_trans.stft.conv_{real,imag}``   ``audio.htsat_mel.{real,imag}``
  ``audio_feats_extractor.log_trans.melW``         ``audio.htsat_mel.mel``
  ``bn0``                                          ``batch_norm``
  ``patch_embed.{proj,norm}``, ``norm``            same
  ``layers.i.blocks.j.norm1 / norm2``              ``layers.i.blocks.j.layernorm_before / layernorm_after``
  ``layers.i.blocks.j.attn.qkv`` (rows q, k, v)    ``...attention.self.{query,key,value}`` (split)
  ``layers.i.blocks.j.attn.proj``                  ``...attention.output.dense``
  ``layers.i.blocks.j.attn.relative_position_*``   ``...attention.self.relative_position_*``
  ``layers.i.blocks.j.mlp.fc1 / fc2``              ``...intermediate.dense / output.dense``
  ``layers.i.downsample.{reduction,norm}``         same
``clap_model.model.`` (laion-clap CLAP)          ``audio.clap.`` (transformers ClapModel)
  ``audio_branch.`` (HTS-AT, names as above)       ``audio_model.audio_encoder.``
  ``audio_branch.spectrogram_extractor.stft.*``    ``audio.clap_mel.{real,imag}``
  ``audio_branch.logmel_extractor.melW``           ``audio.clap_mel.mel``
  ``text_branch.`` (RoBERTa)                       ``text_model.``
  ``{audio,text}_projection.{0,2}``                ``{audio,text}_projection.linear{1,2}``
  ``logit_scale_a``, ``logit_scale_t``             same
``audio_clap_resampler.kernel`` (32 -> 48 kHz)   ``audio.resampler``
===============================================  ===============================================

Accounted for without a place of their own, each checked: ``audio_Qformer.bert.embeddings.position_ids``
(a constant ``arange`` buffer), ``special_tokens_embed.model.*`` (the same BART registered a
second time inside AutoCap's SpecialTokensEmbeddings: equal to ``decoder.model.*``), BART's tied
copies of its token embeddings, the HTS-ATs' shifted-window ``attn_mask`` buffers (equal to the
masks transformers builds), their AudioSet heads ``tscam_conv`` / ``head`` (AutoCap reads
``fine_grained_embedding`` and laion-clap ``embedding``, both taken before them) and laion-clap's
``{audio,text}_transform`` (MLP heads of its training loss, unused for embeddings). The front-end
kernels and filters are checked against torchlibrosa's formulas for the yaml's ``audio_args``
(a mismatch is an error). The RoBERTa text branch loads (sizes from the tensors, 64-dim heads as
roberta-base) but captioning never runs it; no RoBERTa tokenizer is needed.

Public API::

    read_autocap_yaml(path) -> dict
    released_config(settings, state, bart_config) -> AutocapConfig
    map_released_state(state, net) -> (mapped state dict, report)
    load_released(ckpt, yaml, bart=None, device="cpu") -> (Autocap, report)   # .caption(raw 32 kHz clips)
    convert_released(ckpt, yaml, out, bart=None) -> (folder, report)   # a folder Autocap.load reads
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from soundlake.core.errors import UserError
from soundlake.core.fingerprints import weights_sha256
from soundlake.models.captioners.autocap import (
    RELEASED_AUDIO,
    Autocap,
    AutocapConfig,
    AutocapNet,
    add_tags,
    save_autocap,
)

# AutoCap's get_meta_dict: the fields, their tags, and the order they are joined in
RELEASED_FIELDS = {"labels": ("<LBL>", "</LBL>"), "video_caption": ("<HQVC>", "</HQVC>"),
                   "title": ("<TITLE>", "</TITLE>"), "subtitle": ("<SUB>", "</SUB>"),
                   "videollama_caption": ("<AVC>", "</AVC>")}
AUDIO_PREFIXES = ("encoder.", "clap_model.", "audio_clap_resampler.")   # placed by autocap_audio
_LAYER = [("attention.self.query", "self_attn.q"), ("attention.self.key", "self_attn.k"),
          ("attention.self.value", "self_attn.v"), ("attention.output.dense", "self_attn.o"),
          ("attention.output.LayerNorm", "self_norm"), ("crossattention.self.query", "cross_attn.q"),
          ("crossattention.self.key", "cross_attn.k"), ("crossattention.self.value", "cross_attn.v"),
          ("crossattention.output.dense", "cross_attn.o"), ("crossattention.output.LayerNorm", "cross_norm"),
          ("intermediate_query.dense", "fc1"), ("output_query.dense", "fc2"), ("output_query.LayerNorm", "ffn_norm")]
_TOP = [("decoder.", "bart."), ("enc_to_dec_proj.", "frame_proj."), ("audio_query_tokens", "qformer.queries"),
        ("audio_Qformer.bert.embeddings.LayerNorm.", "qformer.query_norm."),
        ("audio_position_embedding.", "qformer.frame_pos."), ("audio_Qfromer_layernorm_embedding.", "qformer.frame_norm."),
        ("audio_qformer_proj.", "qformer.out."), ("clap_proj.", "clap_proj."), ("clap_layernorm.", "clap_norm."),
        ("special_tokens_embed.special_token_embed.", "tag_embed.")]


@dataclass
class MappingReport:
    mapped: dict[str, str] = field(default_factory=dict)        # checkpoint key -> our key
    split: dict[str, tuple] = field(default_factory=dict)       # checkpoint key -> our keys (HTS-AT qkv -> q, k, v)
    checked: dict[str, str] = field(default_factory=dict)       # checkpoint key -> why it needs no place
    constants: list[str] = field(default_factory=list)          # our index buffers the checkpoint does not store

    def placed(self) -> set[str]:
        """Our keys that got a checkpoint tensor."""
        return set(self.mapped.values()) | {k for keys in self.split.values() for k in keys}

    def summary(self) -> str:
        return (f"{len(self.mapped) + len(self.split)} tensors loaded ({len(self.split)} split into query/key/value), "
                f"{len(self.checked)} duplicates/constants/unused heads checked")


class _Loader(yaml.SafeLoader):
    """AutoCap's yaml starts with ``target: !module ...``: read unknown tags as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                              if isinstance(node, yaml.ScalarNode) else None)


def read_autocap_yaml(path: str | Path) -> dict:
    try:
        settings = yaml.load(Path(path).read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the AutoCap yaml: {str(e).splitlines()[0]}") from None
    for key in ("model", "audio_qformer", "tokenizer", "text_decoder_args"):
        if not isinstance(settings, dict) or key not in settings:
            raise UserError(f"{path}: not an AutoCap settings file (no {key!r} section)")
    if settings["model"].get("use_text_qformer"):
        raise UserError(f"{path}: model.use_text_qformer is true; only the released layout (metadata tokens "
                        "straight into BART) is supported")
    return settings


def _map_key(key: str) -> str | None:
    m = re.match(r"audio_Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$", key)
    if m:
        for theirs, ours in _LAYER:
            if m.group(2).startswith(theirs + "."):
                return f"qformer.layers.{m.group(1)}.{ours}{m.group(2)[len(theirs):]}"
        return None
    for theirs, ours in _TOP:
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs):]
    return None


def released_config(settings: dict, state: dict[str, torch.Tensor]) -> AutocapConfig:
    """Our config for the released model: sizes read from the tensors, the rest from the yaml."""
    q = settings["audio_qformer"]
    keys = settings["model"].get("meta_keys") or []
    tags = list(settings["tokenizer"].get("special_tokens") or [])
    fields = [[k, *RELEASED_FIELDS[k]] for k in RELEASED_FIELDS if k in keys]   # AutoCap's ordered_keys
    missing = [t for f in fields for t in f[1:] if t not in tags]
    if missing:
        raise UserError(f"the yaml's tokenizer.special_tokens lack {missing}, needed by model.meta_keys {keys}")
    rows = state["special_tokens_embed.special_token_embed.weight"].shape[0]
    if rows != len(tags):
        raise UserError(f"the checkpoint has {rows} special-token embeddings, the yaml lists {len(tags)} tokens")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"audio_Qformer\.bert\.encoder\.layer\.(\d+)\.", k))}
    audio = settings.get("audio_args", {})
    return AutocapConfig(
        frame_dim=state["enc_to_dec_proj.weight"].shape[1],
        clap_dim=state["clap_proj.weight"].shape[1] if "clap_proj.weight" in state else 0,
        sample_rate=int(audio.get("sr", 32000)), window_s=float(audio.get("max_length", 10)),
        num_queries=state["audio_query_tokens"].shape[1], qformer_dim=state["audio_query_tokens"].shape[2],
        qformer_layers=len(layers), qformer_heads=int(q["num_attention_heads"]),
        qformer_ffn=state["audio_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        qformer_eps=1e-12, max_frames=state["audio_position_embedding.weight"].shape[0],
        feature_dropout=float(settings["model"].get("audio_features_dropout_p", 0.2)),
        tokenizer="bart", fields=fields, tag_tokens=tags, input_order="genau",   # GenAU's forward_decoder
        max_meta_tokens=int(settings.get("meta", {}).get("max_prompt_len", 128)),
        max_caption_tokens=int(settings["tokenizer"].get("max_length", 30)), num_beams=3, max_length=30, min_length=2)


def map_released_state(state: dict[str, torch.Tensor], net: AutocapNet) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Our state dict from the checkpoint's, and where every checkpoint tensor went."""
    report = MappingReport()
    ours = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(AUDIO_PREFIXES):
            continue   # the audio encoders: build_released_audio
        if key == "audio_Qformer.bert.embeddings.position_ids":
            if not torch.equal(value.flatten(), torch.arange(value.numel(), dtype=value.dtype)):
                raise UserError(f"{key}: expected the constant 0..{value.numel() - 1}")
            report.checked[key] = "constant position ids"
            continue
        if key.startswith("special_tokens_embed.model."):
            twin = "decoder.model." + key[len("special_tokens_embed.model."):]
            if twin not in state or not torch.equal(state[twin], value):
                raise UserError(f"{key}: expected the same tensor as {twin}")
            report.checked[key] = f"same module as {twin}"
            continue
        target = _map_key(key)
        if target is None:
            raise UserError(f"checkpoint tensor {key!r} has no place in soundlake's autocap (unknown AutoCap layout)")
        if target not in ours:
            # BART ties its token embeddings: a tied copy our state dict does not list
            shared = net.bart.get_input_embeddings().weight
            if target.startswith("bart.") and value.shape == shared.shape and "bart.model.shared.weight" in out \
                    and torch.equal(value, out["bart.model.shared.weight"]):
                report.checked[key] = "tied to decoder.model.shared.weight"
                continue
            raise UserError(f"checkpoint tensor {key!r} maps to {target!r}, which soundlake's model does not have")
        if tuple(ours[target].shape) != tuple(value.shape):
            raise UserError(f"{key}: shape {tuple(value.shape)} but soundlake's {target} is {tuple(ours[target].shape)}")
        out[target] = value
        report.mapped[key] = target
    return out, report


def _bart_for(settings: dict, state: dict[str, torch.Tensor], bart: str | Path | None):
    from transformers import BartConfig, BartForConditionalGeneration

    name = settings["text_decoder_args"].get("name", "facebook/bart-base")
    source = str(bart) if bart else name
    try:
        config = BartConfig.from_pretrained(source, local_files_only=True)
    except OSError:
        raise UserError(f"BART config for {name!r} not found: pass the folder of {name} (config.json and tokenizer) "
                        "with --bart") from None
    rows = state["decoder.model.shared.weight"].shape[0]
    pos = state["decoder.model.encoder.embed_positions.weight"].shape[0]
    dec_pos = state.get("decoder.model.decoder.embed_positions.weight", state["decoder.model.encoder.embed_positions.weight"]).shape[0]
    if pos != dec_pos:
        raise UserError(f"the checkpoint's BART encoder has {pos} positions and its decoder {dec_pos}: "
                        "extended encoder positions are not supported")
    config.vocab_size, config.max_position_embeddings = rows, pos - 2
    return BartForConditionalGeneration(config), source


def load_released(ckpt: str | Path, yaml_path: str | Path, bart: str | Path | None = None,
                  device: str = "cpu") -> tuple[Autocap, MappingReport]:
    """The released AutoCap as a soundlake Autocap that captions raw 32 kHz audio."""
    from transformers import AutoTokenizer

    from soundlake.models.captioners.autocap_audio import build_released_audio

    settings = read_autocap_yaml(yaml_path)
    try:
        raw = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a bad file
        raise UserError(f"{ckpt}: cannot read the checkpoint: {str(e).splitlines()[0]}") from None
    state = raw.get("state_dict", raw.get("model")) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "enc_to_dec_proj.weight" not in state:
        raise UserError(f"{ckpt}: not an AutoCap checkpoint (no state_dict with enc_to_dec_proj)")
    cfg = released_config(settings, state)
    bart_model, source = _bart_for(settings, state, bart)
    cfg.bart = source
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    base_vocab = add_tags(tokenizer, cfg)
    net = AutocapNet(cfg, bart_model, base_vocab)
    mapped, report = map_released_state(state, net)
    net.load_state_dict(mapped, strict=True)
    audio = build_released_audio(state, settings, report)
    if audio.frame_dim != cfg.frame_dim or audio.clap_dim != cfg.clap_dim:
        raise UserError(f"{ckpt}: the audio encoders give {audio.frame_dim}-dim frames and {audio.clap_dim}-dim CLAP "
                        f"embeddings, enc_to_dec_proj/clap_proj take {cfg.frame_dim}/{cfg.clap_dim}")
    model = Autocap(net, tokenizer, audio.to(device), model_id=str(ckpt), model_hash=weights_sha256(Path(ckpt)),
                    device=device)
    return model, report


def convert_released(ckpt: str | Path, yaml_path: str | Path, out: str | Path,
                     bart: str | Path | None = None) -> tuple[Path, MappingReport]:
    """Write the released AutoCap as an autocap folder (``caption.autocap_model`` loads it)."""
    model, report = load_released(ckpt, yaml_path, bart=bart)
    out = Path(out)
    model.audio.save(out / "audio")
    save_autocap(model.net, model.tokenizer, out, None, extra={
        "audio_encoder": {"kind": RELEASED_AUDIO, "path": "audio"},
        "converted_from": {"checkpoint": str(ckpt), "checkpoint_sha256": model.model_hash, "yaml": str(yaml_path),
                           "bart": str(model.cfg.bart)}})
    return out, report
