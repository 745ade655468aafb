"""Benchmarks: each prints a table, writes JSON (and a plot) under bench/results/."""
