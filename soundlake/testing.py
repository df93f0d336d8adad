"""Test corpora on disk: mixed-format audio and every kind of bad input.

Used by the tests and the benchmarks (not by the pipeline). Real files, encoded by
libsndfile in-process or by ffmpeg for the containers it does not write.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

# extension -> how to write it (soundfile format/subtype, or "ffmpeg" with codec args)
FORMATS: dict[str, tuple] = {
    "wav": ("sf", "WAV", "PCM_16"),
    "flac": ("sf", "FLAC", "PCM_16"),
    "ogg": ("sf", "OGG", "VORBIS"),
    "opus": ("sf", "OGG", "OPUS"),
    "mp3": ("sf", "MP3", "MPEG_LAYER_III"),
    "m4a": ("ffmpeg", "-c:a", "aac", "-b:a", "96k"),
    "webm": ("ffmpeg", "-c:a", "libopus", "-b:a", "64k"),
}


def tone_mix(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = rng.uniform(200, 2000)
    x = 0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t)
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_audio(path: Path, audio: np.ndarray, sr: int, ext: str | None = None) -> Path:
    ext = ext or path.suffix.lstrip(".")
    kind = FORMATS[ext]
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind[0] == "sf":
        rate = 48000 if ext == "opus" and sr not in (8000, 12000, 16000, 24000, 48000) else sr
        if rate != sr:
            import soxr
            audio = soxr.resample(audio, sr, rate)
        sf.write(str(path), audio, rate, format=kind[1], subtype=kind[2])
    else:
        wav = path.with_suffix(".tmp.wav")
        sf.write(str(wav), audio, sr)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), *kind[1:], str(path)],
                       check=True, timeout=120)
        wav.unlink()
    return path


def make_corpus(folder: Path, n_files: int, seconds: float = 10.0, sr: int = 44100,
                formats: tuple[str, ...] = tuple(FORMATS), seed: int = 0) -> list[Path]:
    """n_files tone/noise files cycling through the formats (names with spaces and non-ASCII too)."""
    paths = []
    for i in range(n_files):
        ext = formats[i % len(formats)]
        name = f"clip {i:04d}.{ext}" if i % 5 == 0 else (f"klang-ü-{i:04d}.{ext}" if i % 7 == 0 else f"c{i:04d}.{ext}")
        sub = folder / f"d{i % 3}"
        paths.append(write_audio(sub / name, tone_mix(seconds, sr, seed + i), sr, ext))
    return paths


def make_bad_inputs(folder: Path) -> dict[str, str | None]:
    """Every bad (and odd but valid) input the segment stage must account for.

    Returns file name (relative) -> expected error class, or None when it must become clips.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str | None] = {}
    good = tone_mix(12.0, 44100, 1)

    write_audio(folder / "good.flac", good, 44100)
    expect["good.flac"] = None
    # corrupt: random bytes behind a plausible name; truncated: a flac cut in half
    (folder / "garbage.mp3").write_bytes(np.random.default_rng(0).integers(0, 256, 40000, dtype=np.uint8).tobytes())
    expect["garbage.mp3"] = "corrupt"
    write_audio(folder / "whole.flac", good, 44100)
    data = (folder / "whole.flac").read_bytes()
    (folder / "truncated.flac").write_bytes(data[: len(data) // 2])
    os.remove(folder / "whole.flac")
    expect["truncated.flac"] = "corrupt"
    (folder / "empty.wav").write_bytes(b"")
    expect["empty.wav"] = "empty"
    (folder / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    expect["notes.wav"] = "not_audio"
    # a video container with no audio stream at all
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=2",
                    "-c:v", "mpeg4", str(folder / "video only.mp4")], check=True, timeout=120)
    expect["video only.mp4"] = "unsupported"
    sf.write(str(folder / "short.wav"), tone_mix(0.5, 16000, 2), 16000)
    expect["short.wav"] = "too_short"
    sf.write(str(folder / "silent.wav"), np.zeros(16000 * 5, np.float32), 16000)
    expect["silent.wav"] = "silent"
    # over an hour: a tiny 8 kHz u-law header claiming > 1 h is enough to be refused before decoding
    sf.write(str(folder / "long.wav"), np.zeros(8000 * 3601, np.int16), 8000, subtype="ULAW")
    expect["long.wav"] = "too_long"
    sf.write(str(folder / "ulaw 8k.wav"), tone_mix(11.0, 8000, 3), 8000, subtype="ULAW")
    expect["ulaw 8k.wav"] = None
    sf.write(str(folder / "hires-96k.wav"), tone_mix(10.0, 96000, 4), 96000, subtype="PCM_24")
    expect["hires-96k.wav"] = None
    sf.write(str(folder / "surround-6ch.wav"), tone_mix(10.0, 48000, 5, channels=6), 48000)
    expect["surround-6ch.wav"] = None  # mono spec: downmixed
    sf.write(str(folder / "naïve ñame 音.wav"), tone_mix(10.0, 22050, 6), 22050)
    expect["naïve ñame 音.wav"] = None
    os.symlink("loop.wav", folder / "loop.wav")          # a symlink to itself
    expect["loop.wav"] = "unreadable"
    os.symlink("missing-target.wav", folder / "dangling.wav")
    expect["dangling.wav"] = "not_found"
    (folder / "sub").mkdir(exist_ok=True)
    os.symlink("..", folder / "sub" / "up")              # a directory loop
    (folder / "readme.txt").write_text("not an input")
    return expect


def make_tiny_hf_clap(path: Path, sample_rate: int = 16000, window_s: float = 2.0, fusion: bool = False) -> Path:
    """A tiny randomly initialised transformers ClapModel + processor, saved like a real checkpoint.

    The tokenizer is the offline MiniLM one, so nothing is downloaded.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
    )

    from soundlake.models.text import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    text_cfg = dict(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=96, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    audio_cfg = dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, window_size=4, depths=[1, 1],
                     num_attention_heads=[1, 2], patch_embeds_hidden_size=8, hidden_size=16,
                     enable_fusion=fusion, fusion_type="aff_2d" if fusion else None)
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(text_config=text_cfg, audio_config=audio_cfg, projection_dim=12))
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=sample_rate, hop_length=160, max_length_s=window_s,
                              fft_window_size=256, frequency_max=4000)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)
    return path


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}Audio: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_bpe_tokenizer(chat: bool):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a dog barks", "rain falls on a roof", "Generate the caption in English:",
                             "the sound of a bell", "Rewrite the audio caption"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:])
    if chat:
        fast.chat_template = _CHAT_TEMPLATE
    return fast


def make_tiny_qwen2_audio(path: Path, instruct: bool = True) -> Path:
    """A tiny random Qwen2-Audio (whisper-style encoder + Qwen2 decoder) and its processor."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tok = _tiny_bpe_tokenizer(chat=instruct)
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=_CHAT_TEMPLATE if instruct else None)
    cfg = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, max_source_positions=1500),
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def make_tiny_causal_lm(path: Path) -> Path:
    """A tiny random Qwen2 causal LM with a chat template (for the refine step)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = _tiny_bpe_tokenizer(chat=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_synth_lake(root: Path, n: int, seconds: float = 2.0, sr: int = 16000, seed: int = 0,
                    run: str = "synth", silence_dbfs: float = -60.0, template: bool = False):
    """A lake under ``root/lake`` of ``n`` synth scenes with their reference captions (and
    template captions with ``template``), written through the real stages without Ray."""
    import pyarrow as pa

    from soundlake.catalog.lake import Lake
    from soundlake.sources.synth import synth_inputs
    from soundlake.stages.base import FLOW
    from soundlake.stages.caption import TemplateCaptionStage
    from soundlake.stages.segment import SegmentSpec, SegmentStage, segment_tables

    lake = Lake(str(Path(root) / "lake"))
    spec = SegmentSpec(sample_rate=sr, window=seconds, loudness=False, silence_dbfs=silence_dbfs)
    stage = SegmentStage(spec, run)
    flow = pa.Table.from_pylist([r for row in synth_inputs(n, seed, seconds) for r in stage.segment_one(row)],
                                schema=FLOW)
    tables = segment_tables(flow)
    captions = [tables["captions"]]
    if template:
        captioner = TemplateCaptionStage(run)
        captions += captioner.tables(captioner.process(flow)).values()
    lake.write_part("clips", tables["clips"], run)
    lake.write_part("captions", pa.concat_tables(captions), run)
    return lake


def make_synth_export(root: Path, n: int, seconds: float = 2.0, sr: int = 16000, shard_count: int = 4,
                      seed: int = 0, splits: dict[str, float] | None = None) -> Path:
    """A lake of ``n`` synth scenes (reference captions, no Ray) exported as shards under
    ``root/shards`` (held-out ``splits`` as ``export --split`` makes them); returns that folder.
    For training tests and benchmarks."""
    from soundlake.export.exporter import ExportArgs, run_export

    lake = make_synth_lake(root, n, seconds, sr, seed, silence_dbfs=-90)
    out = Path(root) / "shards"
    run_export(lake, ExportArgs(out=str(out), shard_count=shard_count, shard_size=None, splits=dict(splits or {})))
    return out


def make_tiny_inhouse_clap(path: Path, window_s: float = 2.0) -> Path:
    """An untrained, tiny in-house CLAP saved through its real save path (autocap's audio encoder in tests)."""
    import torch

    from soundlake.models.clap.inhouse import ClapNet, ClapTrainConfig, save_clap
    from soundlake.models.text import load_text_encoder

    cfg = ClapTrainConfig(window_s=window_s, channels=16, dim=16, n_mels=16, n_fft=512, hop_length=320)
    text = load_text_encoder()
    torch.manual_seed(0)
    save_clap(ClapNet(cfg, text.dim), cfg, text, path)
    return path


def tiny_autocap_config(**overrides):
    """Sizes for tests: every part of the architecture, a few thousand parameters each."""
    from soundlake.models.captioners.autocap import AutocapConfig

    sizes = dict(num_queries=4, qformer_dim=16, qformer_layers=1, qformer_heads=2, qformer_ffn=32, d_model=32,
                 encoder_layers=1, decoder_layers=1, heads=2, ffn=64, vocab_size=200, max_meta_tokens=32,
                 max_caption_tokens=24, max_length=12, num_beams=2)
    return AutocapConfig(**{**sizes, **overrides})


def make_tiny_autocap(path: Path, clap_path: Path, texts: list[str]) -> Path:
    """A random tiny autocap (real tokenizer training, BART from a config, saving path) around ``clap_path``."""
    import torch

    from soundlake.models.captioners.autocap import (
        AutocapNet,
        ClapAudio,
        add_tags,
        build_tokenizer,
        new_bart,
        save_autocap,
    )

    cfg = tiny_autocap_config()
    audio = ClapAudio(clap_path)
    cfg.frame_dim, cfg.clap_dim, cfg.sample_rate = audio.frame_dim, audio.clap_dim, audio.sample_rate
    tok = build_tokenizer(cfg, texts)
    base = add_tags(tok, cfg)
    torch.manual_seed(0)
    save_autocap(AutocapNet(cfg, new_bart(cfg, tok, base), base).eval(), tok, path, clap_path)
    return path


def make_tiny_bart(path: Path) -> Path:
    """A tiny random BartForConditionalGeneration with a byte-level BPE tokenizer using BART's special tokens."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a dog barks", "rain falls on a roof", "the sound of a bell", "a man speaks"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(fast), d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_tiny_generator(folder: Path, depth: int = 2, hidden: int = 32, train_seconds: float = 0.5,
                        seed: int = 0, backbone: str = "dit", sources: list[str] | None = None,
                        vae: str = "waveform") -> Path:
    """A tiny randomly initialised DiT model folder (DiT + VAE + MiniLM text), saved with
    ``save_model`` like a trained one, so ``Generator.load(folder)`` reads it back.
    ``backbone="fit"``: the FIT backbone instead; ``sources``: a dataset-ID vocabulary;
    ``vae="mel2d"``: a 2D mel VAE (8 frequency rows per latent frame, Griffin-Lim inversion).

    The zero-initialised layers (adaLN-zero gates, cross-attention outputs, the final
    projection) get small random values: an untrained DiT would otherwise output 0.
    """
    import torch

    from soundlake.generation.backbones import build_backbone, config_dict
    from soundlake.generation.diffusion import Schedule
    from soundlake.generation.dit import DiTConfig
    from soundlake.generation.fit import FITConfig
    from soundlake.generation.mel_vae import MelVAE, MelVAEConfig, latent_geometry
    from soundlake.generation.model_folder import save_model
    from soundlake.generation.vae import VAEConfig, WaveVAE

    torch.manual_seed(seed)
    if vae == "mel2d":
        vcfg = MelVAEConfig(latent="2d", channels=4, channel_mults=[1, 1, 1], freq_down=[2, 4], res_blocks=1,
                            latent_dim=4)
        vae_model, geometry = MelVAE(vcfg), latent_geometry(vcfg.to_dict())
    else:
        vcfg = VAEConfig(sample_rate=16000, channels=4, channel_mults=[1, 1, 1, 1], strides=[2, 4, 5, 8],
                         latent_dim=4)
        vae_model, geometry = WaveVAE(vcfg), {}
    grid = {"grid_freq": geometry["grid_freq"]} if geometry else {}
    common = dict(in_channels=vcfg.latent_dim, hidden=hidden, depth=depth, heads=2, cond_dim=384, sola_rank=4,
                  time_freq_dim=32, sources=list(sources or []))
    if backbone == "dit":
        common |= grid
    dcfg = DiTConfig(**common) if backbone == "dit" else FITConfig(group_size=4, latents_per_group=2, **common)
    dit = build_backbone(config_dict(dcfg))
    with torch.no_grad():
        for p in dit.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    folder = Path(folder)
    vae_meta = {"config": vcfg.to_dict()} | ({"latents": geometry} if geometry else {})
    save_model(folder / "vae", "vae", vae_model, vae_meta)
    save_model(folder, "dit", dit, {"config": config_dict(dcfg), "schedule": Schedule().meta(),
                                    "latents": {"mean": 0.0, "std": 1.0, **grid}, "text": {"path": None},
                                    "train": {"step": 0, "spec": {"seconds": train_seconds}}})
    return folder
