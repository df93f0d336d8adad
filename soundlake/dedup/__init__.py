"""Near-duplicate detection: content fingerprints, embedding neighbours, duplicate groups."""
