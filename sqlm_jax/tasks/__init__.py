"""Self-play topics. `get_task(name)` returns the Task for a topic name used in configs."""

from __future__ import annotations

from sqlm_jax.tasks.base import Proposal, Task

TASK_NAMES = ("arithmetic", "algebra", "generic", "coding")


def get_task(name: str) -> Task:
  """The Task called `name`; "generic" uses generic.DEFAULT_TOPIC (generic.make_task takes any).

  Modules are imported here, not at the top, so that one topic's dependencies (the coding
  sandbox) are only needed by runs that use it.
  """
  if name == "arithmetic":
    from sqlm_jax.tasks import arithmetic
    return arithmetic.TASK
  if name == "algebra":
    from sqlm_jax.tasks import algebra
    return algebra.TASK
  if name == "generic":
    from sqlm_jax.tasks import generic
    return generic.make_task()
  if name == "coding":
    from sqlm_jax.tasks import coding
    return coding.TASK
  raise ValueError(f"unknown task {name!r}; valid names are {', '.join(TASK_NAMES)}")
