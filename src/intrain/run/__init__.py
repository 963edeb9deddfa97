"""A training run: its options and recipes, the loop, checkpoints, run files, evaluation."""
