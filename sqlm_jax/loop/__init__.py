"""The self-play loop: one step's phases, each role's machinery, what a run logs and saves."""
