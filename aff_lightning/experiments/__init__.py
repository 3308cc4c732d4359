"""Experiments on top of the library: the seed grid, its report and hyperparameter tuning."""
