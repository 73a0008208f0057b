"""Self-play topics. `get_task(name)` returns the Task for a topic name used in configs."""

from __future__ import annotations

import importlib

from sqlm_jax.tasks.base import Proposal, Task

TASK_NAMES = ("arithmetic", "algebra", "generic", "coding", "tiny_addition", "tiny_arithmetic")
PROPOSAL_FORMATS = ("tagged", "reference")
REFERENCE_FORMAT_TASKS = ("arithmetic", "algebra", "coding")  # With the reference's formats.


def get_task(name: str, proposal_format: str = "tagged") -> Task:
  """The Task called `name`; "generic" uses generic.DEFAULT_TOPIC (generic.make_task takes any).

  proposal_format: "tagged" (ours: the question in <question> tags, else malformed) or
  "reference" (the reference trainer's prompts and parsers; arithmetic, algebra and coding).

  Modules are imported here, not at the top, so that one topic's dependencies (the coding
  sandbox) are only needed by runs that use it.
  """
  if proposal_format not in PROPOSAL_FORMATS:
    raise ValueError(f"unknown proposal format {proposal_format!r}; valid formats are "
                     f"{', '.join(PROPOSAL_FORMATS)}")
  if proposal_format == "reference" and name not in REFERENCE_FORMAT_TASKS:
    raise ValueError(f"task {name!r} has no reference proposal format; use 'tagged', or one of "
                     f"{', '.join(REFERENCE_FORMAT_TASKS)}")
  reference = proposal_format == "reference"
  if name == "arithmetic":
    from sqlm_jax.tasks import arithmetic
    return arithmetic.REFERENCE_TASK if reference else arithmetic.TASK
  if name == "algebra":
    from sqlm_jax.tasks import algebra
    return algebra.REFERENCE_TASK if reference else algebra.TASK
  if name == "generic":
    from sqlm_jax.tasks import generic
    return generic.make_task()
  if name == "coding":
    return _coding_task(proposal_format)
  if name == "tiny_addition":
    from sqlm_jax.tasks import tiny_addition
    return tiny_addition.TASK
  if name == "tiny_arithmetic":
    from sqlm_jax.tasks import tiny_arithmetic
    return tiny_arithmetic.TASK
  raise ValueError(f"unknown task {name!r}; valid names are {', '.join(TASK_NAMES)}")


def _coding_task(proposal_format: str) -> Task:
  try:
    coding = importlib.import_module("sqlm_jax.tasks.coding")
  except ModuleNotFoundError as error:
    if error.name != "sqlm_jax.tasks.coding":
      raise
    raise ValueError("task 'coding' needs sqlm_jax/tasks/coding.py, which this checkout lacks; "
                     "use one of arithmetic, algebra, generic, tiny_addition, "
                     "tiny_arithmetic") from error
  if proposal_format == "reference":
    return coding.make_task(proposal_format="reference")
  return coding.TASK
