"""Measurements: accuracy against a baseline (and, later, throughput and latency)."""
