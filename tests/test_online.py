"""Online teachers: each (prompt, seed) asked once (across instances and processes), only the
uncached prompts sent, clear errors; HTTP against a loopback server in a thread."""

import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from afd_jax.teachers import online
from afd_jax.teachers.physics import stable_hash


def render(prompts, seed):
  """A deterministic stand-in teacher: uint8 [B, 2, 4, 4, 3] noise per (prompt, seed)."""
  return np.stack([np.random.default_rng([seed, stable_hash(p)]).integers(0, 256, (2, 4, 4, 3),
                                                                           dtype=np.uint8)
                   for p in prompts])


class Counting:
  def __init__(self):
    self.calls = []

  def __call__(self, prompts, seed):
    self.calls.append((list(prompts), seed))
    return render(prompts, seed)


def refuse(prompts, seed):
  raise AssertionError(f"the teacher was asked again for {prompts} (seed {seed})")


def test_callable_teacher_asks_once_per_prompt_and_seed(tmp_path):
  fn = Counting()
  teacher = online.CallableTeacher(fn, tmp_path / "cache")
  np.testing.assert_array_equal(teacher(["a", "b"], 0), render(["a", "b"], 0))
  out = teacher(["b", "c", "b"], 0)
  np.testing.assert_array_equal(out, render(["b", "c", "b"], 0))
  teacher(["a"], 1)
  assert fn.calls == [(["a", "b"], 0), (["c"], 0), (["a"], 1)]  # only what the cache lacked
  files = sorted(p.name for p in (tmp_path / "cache").glob("*"))
  assert files == sorted([f"{online.cache_key(p, s)}.npy" for p, s in
                          (("a", 0), ("b", 0), ("c", 0), ("a", 1))] + ["locks"])

  again = online.CallableTeacher(refuse, tmp_path / "cache")  # a restart: a new instance
  np.testing.assert_array_equal(again(["c", "a"], 0), render(["c", "a"], 0))

  script = ("import sys, numpy as np\n"
            "from afd_jax.teachers import online\n"
            "def refuse(prompts, seed): raise SystemExit(f'asked again for {prompts}')\n"
            "out = online.CallableTeacher(refuse, sys.argv[1])(['a', 'b', 'c'], 0)\n"
            "sys.stdout.write(out.tobytes().hex())\n")
  child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120)
  assert child.returncode == 0, child.stderr
  assert bytes.fromhex(child.stdout) == render(["a", "b", "c"], 0).tobytes()


@pytest.mark.parametrize("answer, match", [
    (lambda p, s: render(p, s).astype(np.float32), "float32 videos.*uint8"),
    (lambda p, s: render(p, s)[:1], r"shape \[1, 2, 4, 4, 3\] for 2 prompts"),
    (lambda p, s: render(p, s)[..., 0], "shape"),
])
def test_callable_teacher_rejects_bad_videos(tmp_path, answer, match):
  teacher = online.CallableTeacher(answer, tmp_path)
  with pytest.raises(online.TeacherError, match=match):
    teacher(["a", "b"], 0)
  assert not list(tmp_path.glob("*.npy"))  # nothing bad is cached


class Handler(http.server.BaseHTTPRequestHandler):
  """Answers by path: /ok videos, /fail HTTP 500, /json a wrong content type, /float floats,
  /hang nothing for 2 s."""

  requests: list = []

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    self.requests.append((self.path, body))
    if self.path == "/fail":
      self.send_error(500, "model exploded")
      return
    if self.path == "/hang":  # connected, never answers in time
      time.sleep(2)
      return
    videos = render(body["prompts"], body["seed"])
    payload = npy_bytes(videos.astype(np.float32) if self.path == "/float" else videos)
    kind = "application/json" if self.path == "/json" else online.NPY_TYPE
    self.send_response(200)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)

  def log_message(self, *args):
    pass


def npy_bytes(array) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv("no_proxy", "127.0.0.1")  # loopback only, whatever the environment says
  Handler.requests = []
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_http_teacher_sends_only_uncached_prompts(server, tmp_path):
  teacher = online.HTTPTeacher(server + "/ok", tmp_path, timeout=30)
  np.testing.assert_array_equal(teacher(["a", "b"], 3), render(["a", "b"], 3))
  np.testing.assert_array_equal(teacher(["b", "c"], 3), render(["b", "c"], 3))
  assert [body for _, body in Handler.requests] == [{"prompts": ["a", "b"], "seed": 3},
                                                    {"prompts": ["c"], "seed": 3}]
  online.HTTPTeacher(server + "/ok", tmp_path)(["a", "c"], 3)  # a restart: no request at all
  assert len(Handler.requests) == 2


def test_http_teacher_errors(server, tmp_path):
  for path, match in (("/fail", "HTTP 500.*model exploded"), ("/json", "Content-Type"),
                      ("/float", "float32 videos.*uint8")):
    with pytest.raises(online.TeacherError, match=match) as e:
      online.HTTPTeacher(server + path, tmp_path / path[1:], timeout=30)(["a"], 0)
    assert server in str(e.value)

  with socket.socket() as s:  # a loopback port nobody listens on
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
  with pytest.raises(online.TeacherError, match="could not be reached"):
    online.HTTPTeacher(closed, tmp_path / "closed", timeout=5)(["a"], 0)
  with pytest.raises(online.TeacherError, match=r"did not answer within 0.3s.*teacher_timeout_s"):
    online.HTTPTeacher(server + "/hang", tmp_path / "hang", timeout=0.3)(["a"], 0)
  with pytest.raises(ValueError, match="http://"):
    online.HTTPTeacher("127.0.0.1:80", tmp_path)
