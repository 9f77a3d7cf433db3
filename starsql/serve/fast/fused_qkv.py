"""q, k and v as one projection for StarCoder2 inference, and one new token's attention over the shared K/V heads.

Decoding one token is a matrix-vector product per projection. StarCoder2's k and v are small (one row of
weights per K/V head dimension), too small to use the GPU's memory bandwidth alone, and each costs a kernel
launch: one matmul for all three reads the same weights in one pass. The fused model computes what the
three projections did, up to bf16 rounding; its state dict holds `qkv_proj`, which `from_pretrained` and
PEFT adapters do not know, so fuse a model only to serve it.
"""

import torch
from transformers.models.starcoder2 import modeling_starcoder2 as starcoder2


def grouped_query_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """Attention of few query tokens (decoding) as two matmuls and a softmax, each group of query heads
    against the K/V head it shares, without copying K/V to all query heads (transformers' SDPA path
    does under torch.compile, and cuDNN's kernel is built for long queries). `attention_mask`: None
    (all visible), boolean or additive, (batch, 1, q_len, >= kv_len). Returns (batch, q_len, heads, dim)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    query = query.reshape(batch, kv_heads, groups * q_len, dim)  # heads are ordered kv_head-major
    scores = torch.matmul(query, key.transpose(-1, -2)).view(batch, kv_heads, groups, q_len, -1) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, -1), value)
    return out.view(batch, heads, q_len, dim).transpose(1, 2)


class FusedQKVAttention(starcoder2.Starcoder2Attention):
    """StarCoder2 attention for inference, with q, k and v as one projection (`qkv_proj`, their
    weights stacked), and one new token attending through `grouped_query_attention`.

    The forward is transformers' Starcoder2Attention.forward with the three projections replaced by one."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states, value_states = (
            states.view(hidden_shape).transpose(1, 2) for states in self.qkv_proj(hidden_states).split(self.qkv_sizes, -1)
        )
        cos, sin = position_embeddings
        query_states, key_states = starcoder2.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        plain_mask = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4)
        if query_states.shape[2] == 1 and not self.training and plain_mask and self.config._attn_implementation == "sdpa":
            # One new token (decoding), with SDPA's masks; flash/flex attention's masks take their own path.
            attn_output = grouped_query_attention(query_states, key_states, value_states, attention_mask, self.scaling)
            attn_weights = None
        else:
            attention_interface = starcoder2.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, starcoder2.eager_attention_forward
            )
            attn_output, attn_weights = attention_interface(
                self, query_states, key_states, value_states, attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                sliding_window=getattr(self.config, "sliding_window", None), **kwargs,
            )  # fmt: skip
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return torch.nn.functional.dropout(attn_output, p=self.residual_dropout, training=self.training), attn_weights


def fuse_qkv_projections(model) -> int:
    """Give every StarCoder2 attention of `model` one q/k/v projection (FusedQKVAttention), in place.
    Plain linear layers only: a 4-bit base or an unmerged LoRA adapter is left as it is. For
    inference: the state dict then holds `qkv_proj`, which `from_pretrained` and PEFT adapters do not
    know. Returns the number of attention layers fused."""
    fused = 0
    for module in list(model.modules()):  # a list: the loop replaces child modules
        projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if type(module) is not starcoder2.Starcoder2Attention or any(type(p) is not torch.nn.Linear for p in projections):
            continue
        weight = projections[0].weight
        qkv = torch.nn.Linear(weight.shape[1], sum(p.out_features for p in projections),
                              bias=projections[0].bias is not None, device=weight.device, dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([p.weight for p in projections]))
            if qkv.bias is not None:
                qkv.bias.copy_(torch.cat([p.bias for p in projections]))
        module.qkv_proj, module.qkv_sizes = qkv, [p.out_features for p in projections]
        del module.q_proj, module.k_proj, module.v_proj
        module.__class__ = FusedQKVAttention
        fused += 1
    return fused
