"""The stages; every module with a registered captioner is imported here so the registry is complete."""
from soundlake.stages import autocap, caption, recaption  # noqa: F401
