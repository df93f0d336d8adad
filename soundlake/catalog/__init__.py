"""The lake: Parquet tables, atomic parts, DuckDB views."""
# Importing these modules registers their tables with the catalog.
from soundlake.stages import clap as _clap  # noqa: F401,E402  (embeddings, tags, scores)
from soundlake.catalog import export as _export  # noqa: F401,E402  (exports, export_members)
