"""Data layer: index and checks, slice cache, splits by patient, exploration, synthetic data."""
