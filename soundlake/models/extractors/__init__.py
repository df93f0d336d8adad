"""The papers' metric extractors, loaded from paths: PANNs CNN14 (FD, KL, IS) and VGGish (FAD)."""
