"""Held-out evaluation: accuracy on sets with ground truth, the sets themselves, HumanEval."""
