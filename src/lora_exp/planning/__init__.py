"""Dry runs: parameter counts and memory estimates without loading weights."""
