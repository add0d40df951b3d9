"""Run folders and model files: their layout, format, lookups and stored settings."""
