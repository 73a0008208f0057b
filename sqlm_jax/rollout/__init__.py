"""Rollouts: the jitted sampler, and each role's weights on their decoding layout."""
