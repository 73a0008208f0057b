"""Self-Questioning Language Models in JAX: a proposer writes questions, a solver answers, both learn."""
