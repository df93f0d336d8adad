"""soundlake: curate audio-caption datasets and retrain text-to-audio generators."""
import os as _os

__version__ = "0.1.0"

# The one place that keeps model code off the hub unless asked: the machines soundlake is
# built on have no internet, and a silent download attempt would hang until its timeout.
# Set HF_HUB_OFFLINE=0 to let transformers download a hub id.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
