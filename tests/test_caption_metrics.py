"""Caption metrics against hand-computed values."""
import math

import numpy as np
import pytest

from soundlake.models.caption_metrics import (
    bleu,
    caption_scores,
    cider_d,
    rouge_l,
    tokenize,
)


class FakeEncoder:
    """Bag-of-words vectors: enough to check the averaging, no model needed."""

    def encode(self, texts):
        vocab = sorted({w for t in texts for w in tokenize(t)})
        out = np.array([[tokenize(t).count(w) for w in vocab] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_tokenize_strips_case_and_punctuation():
    assert tokenize("A dog barks, loudly!") == ["a", "dog", "barks", "loudly"]


def test_identical_captions_score_perfectly():
    c = ["a dog barks loudly", "rain falls on a roof"]
    r = [[x] for x in c]
    assert bleu(c, r, 4) == pytest.approx(1.0)
    assert rouge_l(c, r) == pytest.approx(1.0)


def test_bleu_by_hand():
    # cand: "the cat sat" vs ref "the cat sat down": unigram 3/3, bigram 2/2; bp = exp(1 - 4/3)
    assert bleu(["the cat sat"], [["the cat sat down"]], 2) == pytest.approx(math.exp(1 - 4 / 3))
    assert bleu(["a b"], [["c d"]], 1) == 0.0


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e") = 3: P = 3/4, R = 3/4, F = P (beta irrelevant when P == R)
    assert rouge_l(["a b c d"], [["a c d e"]]) == pytest.approx(0.75)
    # best precision and recall over two references
    p, r = 2 / 2, 2 / 4
    f = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert rouge_l(["a b"], [["a b c d", "x y"]]) == pytest.approx(f)


def test_cider_d_rewards_consensus_and_penalises_length():
    refs = [["a dog barks", "a dog is barking"], ["rain on a roof", "rain falls on a roof"]]
    good = cider_d(["a dog barks", "rain on a roof"], refs)
    bad = cider_d(["rain on a roof", "a dog barks"], refs)
    longer = cider_d(["a dog barks " * 4, "rain on a roof " * 4], refs)
    assert good > 1.0 > bad and good > longer > 0


def test_cider_d_single_pair_by_hand():
    # Two images, so idf = log(2) - log(df). "x y" vs refs ["x y"] and ["z w"]:
    # every n-gram of the first set has df 1 -> weight log 2; identical vectors -> cosine 1
    # for n = 1, 2 and no 3-/4-grams -> mean over n = (1 + 1 + 0 + 0) / 4, length penalty 1, x10.
    assert cider_d(["x y"], [["x y"]]) == 0.0  # one image: idf log(1) - log(1) = 0
    score = cider_d(["x y", "z w"], [["x y"], ["z w"]])
    assert score == pytest.approx(10 * 0.5)


def test_caption_scores_bundle():
    s = caption_scores(["a dog barks"], [["a dog barks", "the dog barks"]], encoder=FakeEncoder(), with_meteor=False)
    assert set(s) == {"bleu_1", "bleu_4", "rouge_l", "cider_d", "sbert_sim", "spider_style", "n", "meteor_skipped"}
    assert s["sbert_sim"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert s["spider_style"] == pytest.approx((s["cider_d"] + s["sbert_sim"]) / 2)
    with pytest.raises(ValueError):
        caption_scores(["x"], [[]], encoder=FakeEncoder())


def test_evaluate_captions_from_a_lake(monkeypatch, tmp_path):
    from datetime import datetime, timezone

    import pyarrow as pa

    from soundlake.catalog import schema
    from soundlake.catalog.lake import Lake
    from soundlake.models.caption_eval import evaluate_captions

    lake = Lake(str(tmp_path / "lake"))
    now = datetime.now(timezone.utc)
    clips = [{**{f.name: None for f in schema.CLIPS}, "clip_id": f"c{i}", "source": "local", "source_id": f"{i}"}
             for i in range(2)]
    lake.write_part("clips", pa.Table.from_pylist(clips, schema=schema.CLIPS), "r")
    caps = [("c0", "reference", "human", "a dog barks"), ("c1", "reference", "human", "rain on a roof"),
            ("c0", "template", "template", "a dog barks"), ("c1", "template", "template", "a dog barks"),
            ("c1", "other", "x", "rain on a roof")]
    rows = [{"clip_id": c, "captioner": k, "model_id": m, "model_hash": None, "prompt_version": None,
             "text": t, "run_id": "r", "created": now} for c, k, m, t in caps]
    lake.write_part("captions", pa.Table.from_pylist(rows, schema=schema.CAPTIONS), "r")
    # No java on PATH: METEOR (a Java process per captioner, tens of seconds on a busy machine) is
    # skipped with its reason; test_meteor_through_the_coco_java_implementation covers it.
    monkeypatch.setenv("PATH", str(tmp_path))
    res = evaluate_captions(lake, "human", encoder=FakeEncoder())
    assert set(res) == {"other", "template"} and all("no Java" in m["meteor_skipped"] for m in res.values())
    assert res["other"]["n"] == 1 and res["other"]["rouge_l"] == pytest.approx(1.0)
    p, r = 1 / 3, 1 / 4  # "a dog barks" vs "rain on a roof": LCS = 1 ("a")
    f = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert res["template"]["n"] == 2 and res["template"]["rouge_l"] == pytest.approx((1.0 + f) / 2)


def test_meteor_is_skipped_with_its_reason_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))   # no java on it
    s = caption_scores(["a dog barks"], [["a dog barks"]], encoder=FakeEncoder())
    assert "meteor" not in s and "no Java" in s["meteor_skipped"]


def test_meteor_through_the_coco_java_implementation():
    """METEOR 1.5's jar: an exact match scores near 1 (only the fragmentation penalty of one
    chunk is left), a synonym or stem still counts, word order and unrelated words lower it."""
    from soundlake.models.caption_metrics import meteor, meteor_unavailable

    why = meteor_unavailable()
    if why:
        pytest.skip(f"METEOR cannot run here: {why}")
    ref = ["a dog barks loudly in the yard"]
    cands = ["a dog barks loudly in the yard", "a dog barking loudly in the yard", "in the yard loudly barks a dog",
             "rain falls on a tin roof"]
    _, (exact, stem, shuffled, other) = meteor(cands, [ref] * 4)
    assert exact > 0.95 and exact > stem > other and exact > shuffled > other and other < 0.2
    # the bundle that `soundlake eval captions` reports carries it (one segment: its own score)
    assert caption_scores(cands[1:2], [ref], encoder=FakeEncoder())["meteor"] == pytest.approx(stem, abs=1e-4)
