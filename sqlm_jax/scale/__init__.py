"""Running on many devices and hosts: mesh and sharding rules, memory plans, one decision per run."""
