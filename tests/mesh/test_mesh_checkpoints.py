"""On 8 fake CPU devices: a run state saved on one mesh restores onto another."""

import jax
import numpy as np

from sqlm_jax.loop import checkpoints, roles, selfplay
from tests.test_selfplay import tiny_config


def test_mesh_checkpoint_saved_as_fsdp8_restores_as_data2_fsdp4(qwen2_dir, tmp_path,
                                                                monkeypatch):
  from tests.test_selfplay import permissive_task
  monkeypatch.setattr(roles, "make_task", lambda config: (permissive_task(), "topic"))
  s8, state = selfplay.setup(tiny_config(qwen2_dir, **{"mesh.data": 1, "mesh.fsdp": 8}))
  # Distinct values everywhere (Adam's moments start at zero), and a step count to carry.
  state.opt_state = jax.tree.map(lambda x: x + 1, state.opt_state)
  state.step = 1
  saved = jax.tree.map(np.asarray, state.arrays())
  embed = state.params["solver"]["embed_tokens"]
  assert embed.sharding.mesh.shape["fsdp"] == 8 and len(embed.sharding.device_set) == 8
  mngr = checkpoints.manager(str(tmp_path))
  checkpoints.save(mngr, state.step, state.arrays(), state.host())
  mngr.wait_until_finished()

  s24, fresh = selfplay.setup(tiny_config(qwen2_dir, **{"mesh.data": 2, "mesh.fsdp": 4}))
  wanted = jax.tree.map(lambda x: x.sharding, fresh.arrays())
  restored, host = selfplay.restore_state(s24, fresh, mngr, newest=10)
  assert restored.step == 1 and host["step"] == 1
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored.arrays())):
    np.testing.assert_array_equal(a, np.asarray(b))  # Bit for bit.
  for want, leaf in zip(jax.tree.leaves(wanted), jax.tree.leaves(restored.arrays())):
    assert leaf.sharding == want  # The new mesh's layout, not the saved one.
  assert restored.params["solver"]["embed_tokens"].sharding.mesh.shape == {
      "data": 2, "fsdp": 4, "tensor": 1}
  mngr.close()
