"""A Llama-family decoder in plain torch, reading the KV cache from the page pool.

The math is the paper's: RMSNorm, rotary positions, grouped-query attention, a
SwiGLU MLP. The base matmuls (`linear`, on weights packed once at load) and the elementwise ops
between them come from kernels/ops.py (C kernels on the CPU), each residual add fused into the
norm after it. Tensor parallelism shows only as
the visible `comm` calls and the row-parallel outputs (`row_output`: base all-reduce with the LoRA communication fused
in); LoRA only as those and the `add_column_lora` calls beside each fused projection. Weights are this rank's shards (Megatron split, see load_model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.attention import AttentionBatch, paged_attention, write_kv
from ..kernels.lora import LoraBatch
from ..kernels.ops import add_rms_norm_, linear, pack_weight, rotary, silu_mul
from .comm import Comm
from .config import ModelConfig
from .loader import Checkpoint, Shard
from .lora import add_column_lora, row_parallel_output


@dataclass
class ForwardBatch:
    """Everything a forward pass needs besides the weights, built once per step.

    input_ids, positions: (T,) int64.
    attention: page tables and slots of the step's sequences.
    lora: the step's adapters, or None when no token has one (no LoRA work, no LoRA collective).
    logits_rows: (S,) int64, the token rows whose next-token logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionBatch
    lora: LoraBatch | None
    logits_rows: torch.Tensor


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, index: int, shard: Shard, row_output=row_parallel_output):
        p = f"model.layers.{index}."
        self.row_output = row_output  # o and down: base all-reduce with the LoRA communication fused in
        h, n = cfg.hidden_size, shard.size
        self.num_heads, self.num_kv_heads = cfg.num_heads // n, cfg.num_kv_heads // n
        self.head_dim, self.eps = cfg.head_dim, cfg.rms_norm_eps
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.input_norm = ckpt.get(p + "input_layernorm.weight", (h,))
        self.post_norm = ckpt.get(p + "post_attention_layernorm.weight", (h,))
        shapes = {"q": (cfg.q_size, h), "k": (cfg.kv_size, h), "v": (cfg.kv_size, h)}
        self.w_qkv = pack_weight(torch.cat([ckpt.get(f"{p}self_attn.{t}_proj.weight", shapes[t], shard) for t in "qkv"]))
        self.b_qkv = None
        if cfg.qkv_bias:
            self.b_qkv = torch.cat([ckpt.get(f"{p}self_attn.{t}_proj.bias", shapes[t][:1], shard) for t in "qkv"])
        self.w_o = pack_weight(ckpt.get(p + "self_attn.o_proj.weight", (h, cfg.q_size), shard, dim=1))
        inter = (cfg.intermediate_size, h)
        self.w_gate_up = pack_weight(torch.cat([ckpt.get(f"{p}mlp.{t}_proj.weight", inter, shard) for t in ("gate", "up")]))
        self.w_down = pack_weight(ckpt.get(p + "mlp.down_proj.weight", (h, cfg.intermediate_size), shard, dim=1))

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None, pool: torch.Tensor, batch: ForwardBatch, rope: tuple,
                comm: Comm) -> torch.Tensor:
        """The residual stream enters as h + delta (delta: the previous layer's MLP output, None in the
        first layer) and leaves as h + the returned MLP output; h is updated in place."""
        x = add_rms_norm_(h, delta, self.input_norm, self.eps)
        x = add_rms_norm_(h, self.attention(x, pool, batch, rope, comm), self.post_norm, self.eps)
        return self.mlp(x, pool, batch, comm)

    def attention(self, x, pool, batch: ForwardBatch, rope, comm: Comm) -> torch.Tensor:
        qkv = linear(x, self.w_qkv, self.b_qkv)
        add_column_lora(qkv, x, pool, batch.lora, "qkv", comm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = rotary(q, k, *rope)  # in place in qkv on the CPU
        write_kv(pool, k, v.unflatten(-1, (self.num_kv_heads, self.head_dim)), batch.attention.slots)
        attn = paged_attention(q, pool, batch.attention, self.num_kv_heads).flatten(1)
        out = linear(attn, self.w_o)  # this rank's partial sum
        return self.row_output(out, attn, pool, batch.lora, "o", comm)

    def mlp(self, x, pool, batch: ForwardBatch, comm: Comm) -> torch.Tensor:
        gate_up = linear(x, self.w_gate_up)
        add_column_lora(gate_up, x, pool, batch.lora, "gate_up", comm)
        act = silu_mul(gate_up)  # silu(gate) * up
        return self.row_output(linear(act, self.w_down), act, pool, batch.lora, "down", comm)


class LlamaModel:
    """The decoder stack with a vocabulary-parallel embedding and head."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, shard: Shard, comm: Comm, row_output=row_parallel_output):
        self.cfg, self.shard, self.comm = cfg, shard, comm
        vocab_shape = (cfg.vocab_size, cfg.hidden_size)
        self.vocab_lo, self.vocab_hi = shard.bounds(cfg.vocab_size)
        self.embed = ckpt.get("model.embed_tokens.weight", vocab_shape, shard)
        if cfg.tie_embeddings or "lm_head.weight" not in ckpt:
            head = self.embed
        else:
            head = ckpt.get("lm_head.weight", vocab_shape, shard)
        # every rank's head has the same number of rows, so the logits all-gather is even
        part = -(-cfg.vocab_size // shard.size)
        head = torch.cat([head, head.new_zeros(part - head.shape[0], head.shape[1])]) if head.shape[0] < part else head
        self.lm_head = pack_weight(head)  # a tied head is a second, packed copy of the embedding where it packs
        self.layers = [DecoderLayer(cfg, ckpt, i, shard, row_output) for i in range(cfg.num_layers)]
        self.norm = ckpt.get("model.norm.weight", (cfg.hidden_size,))
        self.inv_freq = cfg.rope.inv_freq(cfg.head_dim).to(ckpt.device)
        self.dtype = ckpt.dtype

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pools: torch.Tensor) -> torch.Tensor:
        """Next-token logits (S, vocab) for batch.logits_rows, in the model's dtype (the sampler widens
        only what it needs: a float32 copy of a decode step's logits costs as much as the greedy pick
        itself). pools: (layers, P, D)."""
        h, delta = self.embed_tokens(batch.input_ids), None
        rope = self.rope(batch.positions)
        for layer, pool in zip(self.layers, pools):
            delta = layer.forward(h, delta, pool, batch, rope, self.comm)
        rows = batch.logits_rows
        h = add_rms_norm_(h[rows], delta[rows], self.norm, self.cfg.rms_norm_eps)
        logits = linear(h, self.lm_head)
        logits = self.comm.all_gather_last(logits, kind="head_all_gather")
        return logits[:, : self.cfg.vocab_size]

    @torch.inference_mode()
    def warm_up(self, rows: int) -> None:
        """Multiplies zeros through each distinct base weight once for every row count 1 .. rows (a decode
        step's tokens, up to --max-num-seqs; the head's rows are the sampled sequences, as many). On the
        CPU, oneDNN builds a matmul for each new row count and weight shape on its first use, 0.3-0.8 ms
        each (measured on an AMD EPYC, bfloat16), and keeps it: without this, each decode step of a size
        not seen since the start paid about 2 ms more. Prefill sizes are left to their first use."""
        weights = {}
        for w in (self.layers[0].w_qkv, self.layers[0].w_o, self.layers[0].w_gate_up, self.layers[0].w_down, self.lm_head):
            if w.layout == torch._mkldnn:  # packed for oneDNN (kernels/ops.py); other weights have nothing to prepare
                weights.setdefault(tuple(w.shape), w)
        for w in weights.values():
            x = torch.zeros(rows, w.shape[1], dtype=self.dtype, device=w.device)
            for m in range(1, rows + 1):
                linear(x[:m], w)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(ids, self.embed)
        mine = (ids >= self.vocab_lo) & (ids < self.vocab_hi)
        h = F.embedding((ids - self.vocab_lo).clamp(0, max(0, self.vocab_hi - self.vocab_lo - 1)), self.embed)
        h = h * mine.unsqueeze(-1).to(h.dtype)
        return self.comm.all_reduce(h, kind="embed_all_reduce")

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype).unsqueeze(1), emb.sin().to(self.dtype).unsqueeze(1)


def load_model(model_dir, cfg: ModelConfig, dtype: torch.dtype, device="cpu", shard: Shard = Shard(),
               comm: Comm | None = None, row_output=None) -> LlamaModel:
    """row_output: the row-parallel projections' communication (None: the fused one); bench/ injects others."""
    ckpt = Checkpoint(model_dir, dtype, device)
    try:
        return LlamaModel(cfg, ckpt, shard, comm or Comm(), row_output or row_parallel_output)
    finally:
        ckpt.close()
