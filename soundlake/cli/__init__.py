"""The `soundlake` command line, one module per command group.

``main`` holds the root app, the group typers, shared options and :func:`main` (the console
script); importing the package imports every command module, so the tree is complete:

    curate     curate, retry-failed
    catalog    sql, status, report thresholds
    export     export
    captions   recaption, evaluate captions, train clap, train captioner, convert autocap
    generate   train vae, train vocoder, train dit, encode, generate
    acoustic   train tokens, train ar, ar-encode (DC-LDM's AR acoustic condition)
    inference  calibrate-cache, evaluate (generation: AudioCache, LiteFocus)
    dedup      dedup, eval-sets add|list
    serve      serve (the web browser: soundlake.serve)
"""
# Importing a command module registers its commands; this order is the order of `soundlake --help`.
# isort: off
from soundlake.cli import curate, captions, catalog, export, generate, acoustic, inference, dedup, serve  # noqa: F401
# isort: on
from soundlake.cli.main import app, main

__all__ = ["app", "main"]
