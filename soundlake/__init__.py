"""soundlake: curate audio-caption datasets and retrain text-to-audio generators."""
__version__ = "0.1.0"
