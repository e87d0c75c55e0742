"""Experiment configs, sweep runners and the synthetic hospital-export generator."""
