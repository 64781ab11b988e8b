"""Experiment support: model definitions used to reproduce the paper's settings."""
