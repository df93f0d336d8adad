"""The lake: Parquet tables, atomic parts, DuckDB views."""
