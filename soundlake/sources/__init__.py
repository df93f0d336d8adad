"""Every source module, imported so that each registers its kinds (see :mod:`soundlake.sources.base`)."""
from soundlake.sources import freesound, local, manifests, synth  # noqa: F401
