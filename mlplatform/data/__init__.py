"""Data: sources (synthetic species, ImageFolder), Ray Data ingest, splits, quality, snapshots."""
