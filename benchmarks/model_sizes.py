"""Parameter counts of the bundled model configs against the sizes their papers publish.

Counted on the meta device (no memory allocated), so even the XL configs take a second:
EzAudio's DiT-L and DiT-XL recipes against EzAudio's 596 M and 874 M (the issue's bar: within
5 %), and the GenAu-sized FIT configs and mel VAE for reference.

    python benchmarks/model_sizes.py          # --quick: the same counts (they cost nothing)
"""
from __future__ import annotations

import argparse

import torch
from common import figure, parse_args

from soundlake.generation.backbones import build_backbone
from soundlake.generation.dit import count_parameters
from soundlake.generation.vae import read_config

FIGURES = ("ezaudio_params", "other_configs")
USES_RAY = False  # tests/test_benchmarks.py runs its quick run beside one that does
EZAUDIO = {"dit-L": 596e6, "dit-XL": 874e6}   # EzAudio's Table 1


def backbone_params(name: str) -> int:
    with torch.device("meta"):
        return count_parameters(build_backbone(read_config(name).get("model", {})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parse_args(ap, {})
    rows = []
    for name, paper in EZAUDIO.items():
        n = backbone_params(name)
        rows.append(f"{name} {n / 1e6:.1f}M vs the paper's {paper / 1e6:.0f}M ({100 * (n - paper) / paper:+.1f}%, "
                    f"{'within' if abs(n - paper) / paper < 0.05 else 'OUTSIDE'} 5%)")
    figure("ezaudio_params", " · ".join(rows))
    others = [f"{name} {backbone_params(name) / 1e6:.1f}M" for name in ("dit-tiny", "fit-tiny", "fit-genau-small",
                                                                         "fit-genau-large")]
    figure("other_configs", " · ".join(others))


if __name__ == "__main__":
    main()
