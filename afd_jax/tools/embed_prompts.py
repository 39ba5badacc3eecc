"""Embed prompts with Wan's umT5 encoder into the ``EMB_DIR/<id>.npy`` files stores read.

    python -m afd_jax.tools.embed_prompts --prompts prompts.jsonl --t5 T5 --tokenizer TOK \
        --out EMB_DIR [--text_len 512] [--batch_size 16]

``--prompts``: the store builder's ``.jsonl`` (``prompt``, optional ``id``) or a ``.txt`` with one
prompt per line (ids: line numbers from 0). ``--t5``: Wan's ``models_t5_umt5-xxl-enc-bf16.pth``,
a Hugging Face ``UMT5EncoderModel`` folder or a converted one; ``--tokenizer``: the
``google/umt5-xxl`` folder. Each file is ``[text_len, d_model]`` float32 in Wan's convention
(rows past the prompt's tokens zero), written atomically; prompts whose file exists are skipped,
so an interrupted run continues where it stopped. Runs on the accelerator when there is one.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from afd_jax import errors
from afd_jax import prompts as prompts_lib
from afd_jax.models import umt5

_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts: .jsonl (prompt, optional id) or .txt.")
_T5 = flags.DEFINE_string("t5", None, "umT5 encoder weights (Wan .pth, HF folder, converted).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "The google/umt5-xxl tokenizer folder.")
_OUT = flags.DEFINE_string("out", None, "Folder for <id>.npy embeddings.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 512, "Tokens per prompt (Wan: 512).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per encoder call.")


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}")
  prompts = Path(_PROMPTS.value)
  if not prompts.is_file():
    raise errors.MissingInput(f"--prompts {prompts} is not a file.")
  items = prompts_lib.read_prompts(prompts)
  t0 = time.perf_counter()
  encoder = umt5.from_pretrained(_T5.value)
  written = prompts_lib.write_embeddings(items, Path(_OUT.value), encoder,
                                         umt5.load_tokenizer(_TOKENIZER.value), _TEXT_LEN.value,
                                         _BATCH.value)
  print(f"{_OUT.value}: {written} prompts embedded, {len(items) - written} already there, "
        f"[{_TEXT_LEN.value}, {encoder.config.dim}] each, in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["prompts", "t5", "tokenizer", "out"])
  errors.run(main)
