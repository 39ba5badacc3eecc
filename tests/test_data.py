"""Prompt pools, the data order, the teacher-sample budget and teachers built from the config."""

import itertools
import threading

import numpy as np
import pytest

from afd_jax import data as data_lib
from afd_jax import encoders
from afd_jax import errors
from afd_jax import teachers
from afd_jax.models import wan
from afd_jax.teachers import physics
from configs import demo, tiny


def test_batches_are_a_function_of_seed_and_step():
  a = [data_lib.batch_ids(k, 8, 20, seed=3) for k in range(10)]
  b = [data_lib.batch_ids(k, 8, 20, seed=3) for k in range(10)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  epoch = np.concatenate([data_lib.batch_ids(k, 4, 20, seed=3) for k in range(5)])
  assert sorted(epoch) == list(range(20))  # each epoch is a permutation of the pool


def test_held_out_prompts_are_never_trained_on():
  pool = data_lib.PromptPool.random(20, 4, 8, num_eval=6)
  assert pool.num_train == 20 and len(pool) == 26
  np.testing.assert_array_equal(pool.eval_ids(), np.arange(20, 26))
  trained = np.concatenate([data_lib.batch_ids(k, 8, pool.num_train, 0) for k in range(30)])
  assert trained.max() < pool.num_train
  with pytest.raises(ValueError, match="held-out"):
    data_lib.PromptPool(np.zeros((3, 4, 8)), num_eval=3)


def test_teacher_sample_budget_is_honoured_and_reproducible():
  calls = []

  def teacher(prompts, seed):
    calls.append((tuple(prompts), seed))
    return physics.PhysicsTeacher(physics.PhysicsWorld(num_frames=3))(prompts, seed)

  prompts = physics.sample_prompts(6)
  source = data_lib.EncodedTeacher(teacher, prompts, encoders.PixelEncoder(4), 2, seed=0)
  seen = {i: set() for i in range(6)}
  for step in range(20):
    ids = data_lib.batch_ids(step, 3, 6, seed=0)
    x = source.latents(ids, step)
    assert x.shape == (3, 3, 8, 8, 48)
    for i, video in zip(ids, x):
      seen[int(i)].add(video.tobytes())
  assert all(1 <= len(v) <= 2 for v in seen.values())
  rendered = sum(len(p) for p, _ in calls)
  assert rendered == sum(len(v) for v in seen.values())  # each (prompt, sample) rendered once
  again = data_lib.EncodedTeacher(teacher, prompts, encoders.PixelEncoder(4), 2, seed=0)
  np.testing.assert_array_equal(again.latents([0, 1, 2], 7), source.latents([0, 1, 2], 7))


def test_physics_teacher_from_the_demo_config():
  c = demo.get_config()
  c.data.num_prompts, c.data.num_eval_prompts = 16, 4
  student = wan.preset("tiny", **c.model.overrides)
  td = teachers.from_config(c, student)
  assert td.latent_shape == (9, 12, 12, 12) and len(td.pool) == 20 and td.pool.num_eval == 4
  assert td.pool.embeddings.shape == (20, 16, 32)
  physics.parse_prompt(td.pool.prompts[-1])
  # Training may use a deliberately wrong world; evaluation always uses the true one.
  c.physics.gravity_range = (0.25, 1.0)
  td = teachers.from_config(c, student)
  np.testing.assert_array_equal(td.reference([0], 3), physics.PhysicsTeacher(
      teachers.physics_world(c, true_world=True))([td.pool.prompts[0]], 3))
  assert not np.array_equal(td.reference([0], 3), td.source.teacher([td.pool.prompts[0]], 3))


def test_config_shapes_must_fit_the_teacher():
  c = demo.get_config()
  c.data.height = 8
  with pytest.raises(ValueError, match=r"--config.data.height=12"):
    teachers.from_config(c, wan.preset("tiny", **c.model.overrides))
  c = demo.get_config()
  with pytest.raises(ValueError, match="in_dim"):
    teachers.from_config(c, wan.preset("tiny"))
  c = tiny.get_config()
  c.data.teacher = "veo"
  with pytest.raises(ValueError, match="not one of"):
    teachers.from_config(c, wan.preset("tiny"))


def test_prefetcher_order_bound_errors_and_shutdown():
  calls = []

  def fn(step):
    calls.append(step)
    if step == 6:
      raise KeyError("step 6 is broken")
    return step * 10

  prefetcher = data_lib.Prefetcher(fn, range(3, 10))
  for got, step in enumerate(range(3, 6), start=1):
    assert prefetcher.get(step) == step * 10
    assert len(calls) <= got + 2  # never more than depth ahead
  with pytest.raises(KeyError, match="step 6 is broken"):
    prefetcher.get(6)
  with pytest.raises(RuntimeError, match="closed"):
    prefetcher.get(7)
  assert calls == [3, 4, 5, 6]

  with data_lib.Prefetcher(lambda s: s, itertools.count(0)) as endless:
    assert [endless.get(s) for s in range(4)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="order"):
      endless.get(9)
  assert not any(t.name == "afd_jax-prefetch" for t in threading.enumerate())

  short = data_lib.Prefetcher(lambda s: s, [0])
  assert short.get(0) == 0
  with pytest.raises(RuntimeError, match="past the last"):
    short.get(1)


def small_teacher(prompts, seed):
  """An online teacher for the test below (``data.teacher_callable="test_data:small_teacher"``)."""
  small_teacher.calls += len(prompts)
  return physics.PhysicsTeacher(physics.PhysicsWorld(size=8, num_frames=3))(prompts, seed)


small_teacher.calls = 0


def test_online_teacher_from_the_config_asks_each_video_once(tmp_path):
  prompts = physics.sample_prompts(10, max_balls=1)
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  c = tiny.get_config()
  c.data.update(teacher="callable", teacher_callable="test_data:small_teacher",
                prompts=str(tmp_path / "prompts.txt"), teacher_cache=str(tmp_path / "cache"),
                num_eval_prompts=2, teacher_samples=1, text_length=16, encoder_patch=2,
                num_frames=3, height=4, width=4)
  student = wan.preset("tiny", in_dim=12, out_dim=12)
  td = teachers.from_config(c, student)
  assert td.pool.prompts == prompts and td.pool.num_train == 8
  for step in range(3):
    assert td.source.latents(np.arange(8), step).shape == (8, 3, 4, 4, 12)
  td = teachers.from_config(c, student)       # a restart: the disk cache answers
  td.source.latents(np.arange(8), 5)
  assert small_teacher.calls == 8              # each prompt once (the shape probe included)


def test_a_stop_request_ends_a_wait_on_a_hanging_reader():
  """SIGTERM while the teacher hangs: ``get`` returns ``STOPPED`` instead of waiting forever."""
  release = threading.Event()
  stop = threading.Event()
  prefetcher = data_lib.Prefetcher(lambda s: release.wait() and s, range(3))
  threading.Timer(0.3, stop.set).start()
  assert prefetcher.get(0, stop=stop.is_set) is data_lib.STOPPED
  release.set()
  prefetcher.close()


def test_online_teacher_config_errors_name_the_file_line_and_module(tmp_path):
  c = tiny.get_config()
  student = wan.preset("tiny", in_dim=12, out_dim=12)
  (tmp_path / "prompts.jsonl").write_text('{"prompt": "one red ball"}\n{"prompt": 3}\n')
  c.data.update(teacher="callable", teacher_callable="test_data:small_teacher",
                prompts=str(tmp_path / "prompts.jsonl"), teacher_cache=str(tmp_path / "cache"))
  with pytest.raises(errors.UserError, match=r"prompts.jsonl:2 is not a JSON object"):
    teachers.from_config(c, student)
  (tmp_path / "prompts.txt").write_text("one red ball\n")
  c.data.prompts = str(tmp_path / "prompts.txt")
  for spec, message in (("no_such_module:fn", "module 'no_such_module' cannot be imported"),
                        ("test_data:no_such_fn", "has no 'no_such_fn'")):
    c.data.teacher_callable = spec
    with pytest.raises(errors.UserError, match=message):
      teachers.from_config(c, student)
