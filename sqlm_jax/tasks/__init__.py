"""Self-play topics. `get_task(name)` returns the Task for a topic name used in configs."""

from __future__ import annotations

import importlib

from sqlm_jax.tasks.base import Proposal, Task

TASK_NAMES = ("arithmetic", "algebra", "generic", "coding", "tiny_addition", "tiny_arithmetic")


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
    return _coding_task()
  if name == "tiny_addition":
    from sqlm_jax.tasks import tiny_addition
    return tiny_addition.TASK
  if name == "tiny_arithmetic":
    from sqlm_jax.tasks import tiny_arithmetic
    return tiny_arithmetic.TASK
  raise ValueError(f"unknown task {name!r}; valid names are {', '.join(TASK_NAMES)}")


def _coding_task() -> Task:
  try:
    coding = importlib.import_module("sqlm_jax.tasks.coding")
  except ModuleNotFoundError as error:
    if error.name != "sqlm_jax.tasks.coding":
      raise
    raise ValueError("task 'coding' needs sqlm_jax/tasks/coding.py, which this checkout lacks; "
                     "use one of arithmetic, algebra, generic, tiny_addition, "
                     "tiny_arithmetic") from error
  return coding.TASK
