"""Benchmarks and the main job; run from the repository root."""
