"""Teacher stores: TFDS/ArrayRecord round trips without TensorFlow, deterministic random access,
disjoint reads from real processes, refusals, the prefetcher, and the build CLI end to end."""

import hashlib
import json
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from afd_jax import data, encoders, video
from afd_jax.teachers import physics
from afd_jax.teachers import store as store_lib

LATENT, TEXT = (3, 2, 2, 4), (5, 6)
ENCODER = {"name": "pixels", "patch": 4}


def make_records(num_prompts=6, samples=lambda p: 1 + p % 3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for p in range(num_prompts):
    text = rng.standard_normal(TEXT).astype(np.float32)
    out += [store_lib.Record(f"prompt {p}", p, s, text,
                             rng.standard_normal(LATENT).astype(np.float32))
            for s in range(samples(p))]
  return out


def build(records, path, **kw):
  return store_lib.build_store(records, path, encoder=ENCODER, fps=8.0, **kw)


def record_of(records, prompt_id, sample):
  (rec,) = [r for r in records if r.prompt_id == prompt_id and r.sample == sample]
  return rec


def test_round_trip_through_tfds_without_tensorflow(tmp_path):
  records = make_records()
  shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
  path = build(shuffled, tmp_path / "store", metadata={"video_shape": [3, 8, 8, 3]},
               shard_bytes=300)  # several shards, records in arrival order
  names = sorted(os.listdir(path))
  assert {"dataset_info.json", "features.json", "metadata.json"} <= set(names)
  shards = [n for n in names if ".array_record-" in n]
  assert len(shards) > 1 and all(n.endswith(f"-of-{len(shards):05d}") for n in shards)

  source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
  assert len(source) == len(records)
  for row in source:
    rec = record_of(records, int(row["prompt_id"]), int(row["sample"]))
    assert row["prompt"].decode() == rec.prompt
    np.testing.assert_array_equal(row["latents"], rec.latents)
    np.testing.assert_array_equal(row["text_embedding"], rec.text_embedding)
  assert "tensorflow" not in sys.modules

  store = store_lib.TeacherStore(path)
  assert store.prompts == [f"prompt {p}" for p in range(6)] and len(store) == 6
  np.testing.assert_array_equal(store.samples_per_prompt, [1, 2, 3, 1, 2, 3])
  assert store.latent_shape == LATENT and store.text_shape == TEXT and store.fps == 8.0
  assert store.metadata["video_shape"] == [3, 8, 8, 3] and store.encoder().name == "pixels"
  assert store.embeddings.shape == (6, *TEXT)
  np.testing.assert_array_equal(store.embeddings[[4, 1]], [record_of(records, p, 0).text_embedding
                                                           for p in (4, 1)])
  embeddings = np.asarray(store.embeddings, np.float32)  # what data.PromptPool does
  np.testing.assert_array_equal(embeddings[2], record_of(records, 2, 0).text_embedding)

  ids = np.array([5, 2, 5, 0, 4])
  picks = store.sample_indices(ids, seed=7)
  latents = store.latents(ids, seed=7)
  assert latents.dtype == np.float32 and latents.shape == (5, *LATENT)
  for x, p, s in zip(latents, ids, picks):
    np.testing.assert_array_equal(x, record_of(records, p, s).latents)
  np.testing.assert_array_equal(store.latents(ids, seed=7), latents)  # deterministic
  # Every stored sample of prompt 5 gets used across seeds.
  assert {int(store.sample_indices([5], seed)[0]) for seed in range(40)} == {0, 1, 2}
  with pytest.raises(store_lib.StoreError, match="outside"):
    store.latents([6], seed=0)


def test_store_is_atomic_and_refuses_to_clobber(tmp_path):
  path = build(make_records(2), tmp_path / "store")
  with pytest.raises(store_lib.StoreError, match="already exists.*--overwrite"):
    build(make_records(3), path)
  build(make_records(3), path, overwrite=True)
  assert len(store_lib.TeacherStore(path)) == 3

  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "notes.txt").write_text("keep me")
  with pytest.raises(store_lib.StoreError, match="not a teacher store"):
    build(make_records(2), tmp_path / "precious", overwrite=True)

  def failing():
    yield from make_records(2)
    raise RuntimeError("teacher crashed")
  with pytest.raises(RuntimeError, match="teacher crashed"):
    build(failing(), tmp_path / "half")
  assert sorted(os.listdir(tmp_path)) == ["precious", "store"]  # no half store, no temp dir


@pytest.mark.parametrize("records, match", [
    ([], "no records"),
    (make_records(3)[:1] + make_records(3)[3:], "0..N-1"),
    (make_records(2) + make_records(2)[:1], "written once"),
    (make_records(2) + [store_lib.Record("prompt 0", 0, 9, np.zeros(TEXT, np.float32),
                                         np.zeros(LATENT, np.float32))], "text embedding differs"),
    (make_records(2) + [store_lib.Record("x", 2, 0, np.zeros(TEXT, np.float32),
                                         np.zeros((3, 2, 2, 5), np.float32))], "same shapes"),
])
def test_build_rejects_bad_records(tmp_path, records, match):
  with pytest.raises(store_lib.StoreError, match=match):
    build(records, tmp_path / "store")
  assert not (tmp_path / "store").exists()


def test_check_refuses_a_store_that_does_not_fit(tmp_path):
  store = store_lib.TeacherStore(build(make_records(2), tmp_path / "store"))
  store.check(latent_shape=LATENT, text_shape=TEXT)
  with pytest.raises(ValueError) as e:
    store.check(latent_shape=(21, 60, 104, 16), text_shape=(512, 4096))
  msg = str(e.value)
  for part in (str(tmp_path / "store"), "[3, 2, 2, 4]", "[21, 60, 104, 16]", "[5, 6]",
               "[512, 4096]", "build_teacher_store"):
    assert part in msg


def test_open_errors_name_the_path_and_the_fix(tmp_path):
  with pytest.raises(store_lib.StoreError, match="does not exist.*build_teacher_store"):
    store_lib.TeacherStore(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(store_lib.StoreError, match="not a teacher store.*build_teacher_store"):
    store_lib.TeacherStore(tmp_path / "empty")

  path = build(make_records(4), tmp_path / "store", shard_bytes=300)
  shards = sorted(p for p in path.iterdir() if ".array_record-" in p.name)
  data_bytes = shards[1].read_bytes()
  shards[1].write_bytes(data_bytes[:len(data_bytes) // 2])
  with pytest.raises(store_lib.StoreError, match=f"{shards[1].name} has .*build_teacher_store"):
    store_lib.TeacherStore(path)
  shards[1].write_bytes(np.random.default_rng(0).bytes(len(data_bytes)))  # same size, garbage
  store = store_lib.TeacherStore(path)
  with pytest.raises(store_lib.StoreError, match="corrupt.*build_teacher_store"):
    for p in range(len(store)):
      for s in range(store.samples_per_prompt[p]):
        store.read([p], "latents", samples=[s])


HOST_SCRIPT = """
import json, sys, hashlib
import numpy as np
from afd_jax.teachers import store as store_lib
index, count, batches = int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
store = store_lib.TeacherStore(sys.argv[1])
out = []
for step, global_ids in enumerate(batches):
  ids, latents = store_lib.host_batch(store, global_ids, seed=step, process_index=index,
                                      process_count=count)
  out.append({"ids": ids.tolist(), "sha": hashlib.sha256(latents.tobytes()).hexdigest()})
print(json.dumps(out))
"""


def run_hosts(path, batches, count=2):
  procs = [subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, str(path), str(i), str(count),
                             json.dumps(batches)], stdout=subprocess.PIPE, text=True)
           for i in range(count)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs)
  return [json.loads(o) for o in outs]


def test_processes_read_disjoint_shares_deterministically(tmp_path):
  path = build(make_records(8), tmp_path / "store")
  batches = [data.batch_ids(step, 4, 8, seed=0).tolist() for step in range(5)]
  first, second = run_hosts(path, batches), run_hosts(path, batches)
  assert first == second  # the same reads in every run
  store = store_lib.TeacherStore(path)
  for step, global_ids in enumerate(batches):
    host0, host1 = first[0][step]["ids"], first[1][step]["ids"]
    assert not set(host0) & set(host1) and host0 + host1 == global_ids
    for host, ids in enumerate((host0, host1)):
      expected = store.latents(ids, seed=step)
      assert first[host][step]["sha"] == hashlib.sha256(expected.tobytes()).hexdigest()


# --- the CLI, end to end ------------------------------------------------------------------------

PROMPTS = ["one red ball dropped, normal gravity, bouncy",
           "two green and blue balls thrown up, weak gravity, soft",
           "three yellow, magenta and cyan balls thrown right, strong gravity, very bouncy"]


def write_webm(frames, path):
  codec = next(c for c in ("libvpx-vp9", "libvpx") if c in av.codecs_available)
  with av.open(str(path), "w", format="webm") as container:
    stream = container.add_stream(codec, rate=Fraction(8))
    stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
    for f in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
    container.mux(stream.encode())


def run_cli(*args):
  command = [sys.executable, "-m", "afd_jax.tools.build_teacher_store", *map(str, args)]
  return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_builds_a_store_and_reports_every_skip(tmp_path):
  teacher = physics.PhysicsTeacher(physics.PhysicsWorld(size=32, num_frames=6))
  videos = tmp_path / "videos"
  (videos / "b").mkdir(parents=True)
  clips = {k: teacher([PROMPTS[i]], seed)[0]
           for k, i, seed in [("a", 0, 0), ("a_1", 0, 1), ("b", 1, 0), ("c", 2, 0)]}
  video.write_mp4(clips["a"], videos / "a.mp4", fps=8)
  np.save(videos / "a_1.npy", clips["a_1"])
  if any(c in av.codecs_available for c in ("libvpx-vp9", "libvpx")):
    write_webm(clips["b"], videos / "b" / "0.webm")
  else:
    np.save(videos / "b" / "0.npy", clips["b"])
  np.save(videos / "c_good.npy", clips["c"])
  (videos / "c_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
  np.save(videos / "c_short.npy", clips["c"][:4])
  np.save(videos / "c_small.npy", clips["c"][:, :16, :16])
  np.save(videos / "e.npy", clips["c"])
  lines = [{"id": "a", "prompt": PROMPTS[0]}, {"id": "b", "prompt": PROMPTS[1]},
           {"id": "c", "prompt": PROMPTS[2],
            "videos": ["c_good.npy", "c_missing.mp4", "c_corrupt.mp4", "c_short.npy",
                       "c_small.npy"]},
           {"id": "d", "prompt": "a prompt nobody rendered"},
           {"id": "e", "prompt": " ".join(["word"] * 40)}]  # longer than the text encoder
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  out = tmp_path / "store"
  result = run_cli("--prompts", tmp_path / "prompts.jsonl", "--videos", videos, "--out", out,
                   "--patch", 4, "--num_frames", 6, "--fit", "exact")
  assert result.returncode == 0, result.stderr

  report = json.loads((out / "report.json").read_text())
  assert report["written"] == 4 and report["prompts"] == 3
  reasons = {(s["prompt_id"], os.path.basename(s["path"] or "")): s["reason"]
             for s in report["skipped"]}
  assert set(reasons) == {("c", "c_missing.mp4"), ("c", "c_corrupt.mp4"), ("c", "c_short.npy"),
                          ("c", "c_small.npy"), ("d", "videos"), ("e", "")}
  assert "does not exist" in reasons[("c", "c_missing.mp4")]
  assert "cannot be decoded" in reasons[("c", "c_corrupt.mp4")]
  assert "[4, 32, 32, 3]" in reasons[("c", "c_short.npy")]
  assert "[6, 16, 16, 3]" in reasons[("c", "c_small.npy")]
  assert "no video found" in reasons[("d", "videos")]
  assert "bad embedding" in reasons[("e", "")]
  for name in ("c_missing.mp4", "c_corrupt.mp4", "c_short.npy", "c_small.npy"):
    assert name in result.stdout

  store = store_lib.TeacherStore(out)
  assert store.prompts == PROMPTS and store.latent_shape == (6, 8, 8, 48) and store.fps == 8.0
  np.testing.assert_array_equal(store.samples_per_prompt, [2, 1, 1])
  encoder = encoders.PixelEncoder(4)
  sources = {(s["prompt_id"], s["sample"]): s["path"] for s in report["samples"]}
  for (p, s), src in sources.items():  # lossy files: compare with what read_video returns
    np.testing.assert_array_equal(store.read([p], "latents", samples=[s])[0],
                                  encoder.encode(video.read_video(src)))
  np.testing.assert_array_equal(store.read([0], "latents", samples=[1])[0],
                                encoder.encode(clips["a_1"]))  # .npy: exact
  np.testing.assert_array_equal(store.embeddings[0], physics.TextEncoder(32, 16)([PROMPTS[0]])[0])


def test_cli_text_embedding_folder_and_refusals(tmp_path):
  teacher = physics.PhysicsTeacher(physics.PhysicsWorld(size=16, num_frames=3))
  (tmp_path / "videos").mkdir()
  (tmp_path / "emb").mkdir()
  for i, prompt in enumerate(PROMPTS):
    np.save(tmp_path / "videos" / f"{i}.npy", teacher([prompt], 0)[0])
  np.save(tmp_path / "emb" / "0.npy", np.ones((4, 8), np.float32))
  np.save(tmp_path / "emb" / "1.npy", np.ones((5, 8), np.float32))  # wrong length; 2.npy missing
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                  for p in PROMPTS))
  args = ["--prompts", tmp_path / "prompts.jsonl", "--videos", tmp_path / "videos",
          "--text_embeddings", tmp_path / "emb", "--out", tmp_path / "store"]
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr
  store = store_lib.TeacherStore(tmp_path / "store")
  assert store.prompts == PROMPTS[:1] and store.text_shape == (4, 8)
  assert store.latent_shape == (3, 4, 4, 48)
  skipped = json.loads((tmp_path / "store" / "report.json").read_text())["skipped"]
  assert [(s["prompt_id"], "bad embedding" in s["reason"]) for s in skipped] == [("1", True),
                                                                                 ("2", True)]

  again = run_cli(*args)
  assert again.returncode != 0 and "already exists" in again.stderr

  (tmp_path / "none.jsonl").write_text(json.dumps({"id": "x", "prompt": PROMPTS[0]}) + "\n")
  nothing = run_cli("--prompts", tmp_path / "none.jsonl", "--videos", tmp_path / "emb",
                    "--out", tmp_path / "empty_store")
  assert nothing.returncode != 0 and "no records" in nothing.stderr
  assert "no video found" in nothing.stdout and not (tmp_path / "empty_store").exists()


def test_cli_encodes_with_the_wan_vae_fitting_videos_to_the_shape(tmp_path, small_vae):
  """15 frames of 24x40 (mp4) are trimmed to 13 and resized to cover 16x16, then centre-cropped;
  a 13x16x16 .npy is taken as is. Latents are the VAE's; the fit and the VAE are recorded."""
  rng = np.random.default_rng(0)
  videos = tmp_path / "videos"
  videos.mkdir()
  big = rng.integers(0, 256, (15, 6, 10, 3), np.uint8).repeat(4, 1).repeat(4, 2)
  video.write_mp4(big, videos / "0.mp4", fps=16)
  np.save(videos / "1.npy", rng.integers(0, 256, (13, 16, 16, 3), np.uint8))
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                  for p in PROMPTS[:2]))
  args = ["--prompts", tmp_path / "prompts.jsonl", "--videos", videos, "--encoder", "wan_vae",
          "--vae", small_vae, "--height", 16, "--width", 16]
  result = run_cli(*args, "--out", tmp_path / "store", "--num_frames", 13)
  assert result.returncode == 0, result.stderr

  store = store_lib.TeacherStore(tmp_path / "store")
  assert store.latent_shape == (4, 2, 2, 16) and store.fps == 16.0
  assert store.metadata["video_shape"] == [13, 16, 16, 3]
  assert store.metadata["preprocess"]["fit"] == "crop"
  assert store.encoder_spec == {"name": "wan_vae", "vae": str(small_vae.absolute()), "chunk": 1,
                                "tile": 0, "tile_stride": 0, "dtype": "float32"}
  report = json.loads((tmp_path / "store" / "report.json").read_text())
  assert [s["fitted_from"] for s in report["samples"]] == [[15, 24, 40, 3], None]
  encoder = store.encoder()
  fitted = video.fit(video.read_video(videos / "0.mp4"), 13, 16, 16, "crop")
  np.testing.assert_allclose(store.read([0], "latents")[0], encoder.encode(fitted), atol=1e-5)
  np.testing.assert_allclose(store.read([1], "latents")[0],
                             encoder.encode(np.load(videos / "1.npy")), atol=1e-5)

  refused = run_cli(*args, "--out", tmp_path / "bad", "--num_frames", 6)
  assert refused.returncode != 0 and "6 frames is not of the form 4k+1" in refused.stderr
  assert "trim to 5 or 9" in refused.stderr and not (tmp_path / "bad").exists()


def test_fit_crops_stretches_and_refuses():
  frames = np.zeros((7, 20, 40, 3), np.uint8)
  frames[:, :, 10:30] = 255                       # a white band in the middle of the width
  crop = video.fit(frames, 5, 16, 16, "crop")     # scaled to 16x32, the middle 16 columns kept
  assert crop.shape == (5, 16, 16, 3) and crop.mean() > 250
  stretch = video.fit(frames, 5, 16, 16, "stretch")
  assert stretch.shape == (5, 16, 16, 3) and 100 < stretch.mean() < 160
  assert video.fit(frames, 7, 20, 40, "exact") is frames
  with pytest.raises(video.VideoError, match="fewer frames"):
    video.fit(frames, 9, 16, 16, "crop")
  with pytest.raises(video.VideoError, match="--fit crop or stretch"):
    video.fit(frames, 5, 16, 16, "exact")
