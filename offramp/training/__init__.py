"""Offline work on models: training and its recipes, the bottleneck, threshold calibration, evaluation reports.

Built on the core only; serving, the daemons and the command line use it.
"""
