"""Evaluation: ranking metrics, baselines and constrained beam search over semantic IDs."""
