"""Analytic FLOP accounting for the Wan DiT (``shared/reference/perf_targets.md`` section 1).

A matmul ``(m x k) @ (k x n)`` costs ``2 m k n``; attention cores cost ``4 Nq Nk d`` per layer.
Unlike the reference tables, every matmul is counted (patch embedding, head, text and time
embedders), so small test configs compare cleanly with XLA's cost analysis; for the 1.3B model
those extras are below 0.5 %.
"""

from __future__ import annotations

from afd_jax.models.wan import WanConfig


def per_token_weight_flops(cfg: WanConfig) -> float:
  """Per video token: self-attn q,k,v,o (8d^2), cross q,o (4d^2), FFN (4dF), patch embed, head."""
  d = cfg.dim
  blocks = cfg.num_layers * (12 * d * d + 4 * d * cfg.ffn_dim)
  io = 2 * cfg.in_dim * cfg.patch_numel * d + 2 * d * cfg.out_dim * cfg.patch_numel
  return blocks + io


def text_flops(cfg: WanConfig, text_len: int) -> float:
  """Text embedder MLP plus the per-layer cross-attention K/V (computed once per prompt)."""
  d = cfg.dim
  return 2 * text_len * (cfg.text_dim * d + d * d) + cfg.num_layers * 4 * text_len * d * d


def time_flops(cfg: WanConfig, frames: int) -> float:
  d = cfg.dim
  return 2 * frames * (cfg.freq_dim * d + d * d + 6 * d * d)


def attention_flops(cfg: WanConfig, query_tokens: int, key_tokens: int) -> float:
  return 4 * cfg.num_layers * query_tokens * key_tokens * cfg.dim


def forward_flops(cfg: WanConfig, frames: int, tokens_per_frame: int, text_len: int,
                  mode: str = "bidirectional", chunk_frames: int | None = None,
                  include_text: bool = True) -> dict[str, float]:
  """FLOPs of one forward over ``frames`` latent frames (per batch element).

  ``teacher_forcing`` processes ``2 x frames`` (clean and noisy) with exact-work attention.
  """
  n = frames * tokens_per_frame
  if mode == "bidirectional":
    self_attn = attention_flops(cfg, n, n)
    tokens = n
  else:
    c = chunk_frames * tokens_per_frame
    chunks = frames // chunk_frames
    prefix = sum(attention_flops(cfg, c, (b + 1) * c) for b in range(chunks))
    if mode == "block_causal":
      self_attn, tokens = prefix, n
    elif mode == "teacher_forcing":
      self_attn, tokens = 2 * prefix, 2 * n
    else:
      raise ValueError(f"unknown mode {mode!r}")
  out = {
      "weights": tokens * per_token_weight_flops(cfg),
      "self_attention": self_attn,
      "cross_attention": attention_flops(cfg, tokens, text_len),
      "text": text_flops(cfg, text_len) if include_text else 0.0,
      "time": time_flops(cfg, tokens // tokens_per_frame),
  }
  out["total"] = sum(out.values())
  return out


def chunk_flops(cfg: WanConfig, chunk_tokens: int, cached_tokens: int, text_len: int,
                frames: int) -> float:
  """One KV-cache chunk forward (text K/V precomputed)."""
  return (chunk_tokens * per_token_weight_flops(cfg)
          + attention_flops(cfg, chunk_tokens, cached_tokens + chunk_tokens)
          + attention_flops(cfg, chunk_tokens, text_len) + time_flops(cfg, frames))


def rollout_flops(cfg: WanConfig, frames: int, tokens_per_frame: int, text_len: int,
                  chunk_frames: int, steps: int, commit_last_chunk: bool = False) -> float:
  """``steps`` denoising passes per chunk plus the t = 0 commit passes, plus the text K/V once."""
  c = chunk_frames * tokens_per_frame
  chunks = frames // chunk_frames
  total = text_flops(cfg, text_len)
  for b in range(chunks):
    passes = steps + (1 if (b < chunks - 1 or commit_last_chunk) else 0)
    total += passes * chunk_flops(cfg, c, b * c, text_len, chunk_frames)
  return total
