"""Pieces of the trainer: presets and config, precision, EMA, checkpoints, evaluation, the loop."""
