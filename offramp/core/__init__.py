"""The core: models, data, codec, wire messages, the model halves at a split and the exit rule, checkpoints.

Imports nothing else of the project: training, serving, the daemons, the experiments and the command line
are built on it.
"""
