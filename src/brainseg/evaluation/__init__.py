"""Scoring models and choosing their settings: evaluate, compare, crossval, tune, and the
post-processing that tune chooses and inference applies."""
