"""Audio-LLM recaptioning: Qwen2-Audio, and a text LLM that refines captions.

* :class:`QwenCaptioner`: ``Qwen2AudioForConditionalGeneration`` + ``AutoProcessor`` from a
  folder. Versioned prompts: the base model's "Generate the caption in English:" after
  the audio tokens, or the instruct model's chat template with the audio. Batched greedy
  (or beam) generation with left padding; audio at the processor's rate.
* :class:`Refiner`: any transformers causal LM with a chat template rewrites a raw
  caption using the clip's title, tags and labels (as Auto-ACD and AudioSetCaps did).
* :func:`lint`: the artefacts LLM captions leak (probabilities, brackets, "label", list
  markers, first person, invented speech content, "creating").
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

QWEN_PROMPTS = {
    "qwen-base-v1": "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:",
    "qwen-instruct-v1": "Describe the sounds in this audio clip in one short English sentence.",
}
REFINE_PROMPTS = {
    "refine-v1": ("Rewrite the audio caption below as one fluent English sentence describing only what "
                  "can be heard. Use the metadata when it agrees with the caption; never quote speech, "
                  "never mention labels, titles or probabilities.\n"
                  "Caption: {caption}\nTitle: {title}\nTags: {tags}\nLabels: {labels}\nRewritten caption:"),
}
LINT_RULES = {
    "probability": re.compile(r"\d+(\.\d+)?\s*%|\bprobab\w*|\b0\.\d+\b", re.I),
    "brackets": re.compile(r"[\[\]{}()<>]"),
    "label": re.compile(r"\blabel(s|led)?\b", re.I),
    "list_marker": re.compile(r"(^|\n)\s*([-*•]|\d+[.)])\s"),
    "first_person": re.compile(r"\b(I|I'm|I've|me|my|we|our|us)\b"),
    "speech_content": re.compile(r"[\"“”]|\b(says|saying|said)\b", re.I),
    "creating": re.compile(r"\bcreating\b", re.I),
}


def lint(text: str) -> list[str]:
    """The rules a caption breaks (empty list: clean)."""
    if not text or not text.strip():
        return ["empty"]
    return [name for name, rule in LINT_RULES.items() if rule.search(text)]


def qwen_prompt_version(path: str, override: str | None = None) -> str:
    """Base and instruct checkpoints share config and processor (both carry a chat
    template), so the released folder names tell them apart; ``override`` forces either."""
    version = override or ("qwen-instruct-v1" if "instruct" in Path(path).name.lower() else "qwen-base-v1")
    if version not in QWEN_PROMPTS:
        raise ValueError(f"unknown prompt version {version!r}; one of {sorted(QWEN_PROMPTS)}")
    return version


def _hash(path: str) -> str:
    from soundlake.core.fingerprints import weight_files, weights_sha256

    return weights_sha256(weight_files(Path(path)))


class QwenCaptioner:
    captioner = "qwen"

    def __init__(self, path: str, prompt_version: str | None = None, device: str = "cpu",
                 max_new_tokens: int = 48, num_beams: int = 1):
        import torch
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # generation continues on the right
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.max_new_tokens, self.num_beams = torch.device(device), max_new_tokens, num_beams
        self.prompt_version = qwen_prompt_version(path, prompt_version)
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.model_id, self.model_hash = str(path), _hash(path)

    def prompt(self) -> str:
        text = QWEN_PROMPTS[self.prompt_version]
        if self.prompt_version.startswith("qwen-instruct"):
            conversation = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip"},
                                                         {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return text

    def caption(self, clips: list[np.ndarray]) -> list[str]:
        """Mono float32 clips at ``self.sample_rate`` -> one caption each."""
        import torch

        if not clips:
            return []
        inputs = self.processor(text=[self.prompt()] * len(clips), audio=[np.asarray(c, np.float32) for c in clips],
                                sampling_rate=self.sample_rate, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      num_beams=self.num_beams)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


class Refiner:
    captioner = "refine"

    def __init__(self, path: str, prompt_version: str = "refine-v1", device: str = "cpu", max_new_tokens: int = 48):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        if prompt_version not in REFINE_PROMPTS:
            raise ValueError(f"unknown prompt version {prompt_version!r}; one of {sorted(REFINE_PROMPTS)}")
        self.prompt_version, self.device, self.max_new_tokens = prompt_version, torch.device(device), max_new_tokens
        self.model_id, self.model_hash = str(path), _hash(path)

    def prompt(self, caption: str, title: str | None, tags: list[str] | None, labels: list[str] | None) -> str:
        user = REFINE_PROMPTS[self.prompt_version].format(
            caption=caption, title=title or "-", tags=", ".join(tags or []) or "-", labels=", ".join(labels or []) or "-")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                  tokenize=False)

    def refine(self, items: list[dict]) -> list[str]:
        """items: {caption, title, tags, labels} -> rewritten captions."""
        import torch

        if not items:
            return []
        prompts = [self.prompt(i["caption"], i.get("title"), i.get("tags"), i.get("labels")) for i in items]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]
