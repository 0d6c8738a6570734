"""ChatGLM2/3 official state-dict names <-> transformers' ``GlmForCausalLM`` names.

Every official tensor becomes one Glm tensor, except the fused ``query_key_value`` (three: q, k, v), so checkpoints
convert tensor by tensor as they are read (a 6B shard never needs its neighbours). The mapping, with ``N`` a layer:

| official (THUDM)                                                  | Glm                                          |
|-------------------------------------------------------------------|----------------------------------------------|
| transformer.embedding.word_embeddings.weight                      | model.embed_tokens.weight                    |
| transformer.encoder.layers.N.input_layernorm.weight               | model.layers.N.input_layernorm.weight        |
| ...layers.N.self_attention.query_key_value.{weight,bias,weight_scale}: rows [0, heads*d) queries,   |
|     then [., +groups*d) keys, then the last groups*d values       | ...self_attn.{q_proj,k_proj,v_proj}.<same>   |
| ...layers.N.self_attention.dense.{weight,weight_scale}            | ...self_attn.o_proj.<same>                   |
| ...layers.N.post_attention_layernorm.weight                       | ...post_attention_layernorm.weight           |
| ...layers.N.mlp.dense_h_to_4h.{weight,weight_scale}: gate rows, then up rows (GlmMLP chunks in that order) |
|                                                                   | ...mlp.gate_up_proj.<same>                   |
| ...layers.N.mlp.dense_4h_to_h.{weight,weight_scale}               | ...mlp.down_proj.<same>                      |
| transformer.encoder.final_layernorm.weight                        | model.norm.weight                            |
| transformer.output_layer.weight (not tied)                        | lm_head.weight                               |
| transformer.prefix_encoder.{embedding,trans.0,trans.2}.*          | prefix_encoder.<same>                        |
| transformer.rotary_pos_emb.inv_freq                               | dropped: the original uses only its dtype    |

The INT4/INT8 layout splits the same way: quantization is per output row (packed along columns), so a row slice of
the integers and of ``weight_scale`` is the quantized form of the row slice of the matrix.
"""

from __future__ import annotations

import re

import torch

from .configuration import ChatGLM2Config

WHOLE = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
IN_LAYER = {  # official name inside ``transformer.encoder.layers.N.`` -> Glm name inside ``model.layers.N.``
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
QKV, QKV_PARTS = "self_attention.query_key_value", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
DROPPED = ("transformer.rotary_pos_emb.inv_freq",)
OFFICIAL_PREFIX, GLM_PREFIX = "transformer.prefix_encoder.", "prefix_encoder."
_OFFICIAL_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale)$")
_GLM_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale)$")


def qkv_sizes(config: ChatGLM2Config) -> list[int]:
    """Rows of the fused ``query_key_value``: all query heads, then the key groups, then the value groups."""
    d = config.kv_channels
    return [config.num_attention_heads * d, config.multi_query_group_num * d, config.multi_query_group_num * d]


def official_to_glm(name: str, tensor: torch.Tensor, config: ChatGLM2Config) -> dict[str, torch.Tensor]:
    """One official tensor -> its Glm tensor(s); a name outside the table passes through unchanged (the loader then
    reports it as unexpected)."""
    if name in DROPPED:
        return {}
    if name in WHOLE:
        return {WHOLE[name]: tensor}
    if name.startswith(OFFICIAL_PREFIX):
        return {GLM_PREFIX + name[len(OFFICIAL_PREFIX):]: tensor}
    match = _OFFICIAL_LAYER.match(name)
    if not match:
        return {name: tensor}
    layer, module, kind = match.groups()
    if module == QKV:
        sizes = qkv_sizes(config)
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"{name} has {tensor.shape[0]} rows; the config's num_attention_heads, "
                             f"multi_query_group_num and kv_channels give {' + '.join(map(str, sizes))}")
        pieces = torch.split(tensor, sizes, dim=0)  # [q rows | k rows | v rows]
        return {f"model.layers.{layer}.{part}.{kind}": piece.contiguous()
                for part, piece in zip(QKV_PARTS, pieces, strict=True)}
    if module in IN_LAYER:
        return {f"model.layers.{layer}.{IN_LAYER[module]}.{kind}": tensor}
    return {name: tensor}


def glm_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole Glm state dict -> official names (q, k and v rows concatenated back into ``query_key_value``)."""
    whole = {glm: official for official, glm in WHOLE.items()}
    in_layer = {glm: official for official, glm in IN_LAYER.items()}
    out, fused = {}, {}
    for name, tensor in state_dict.items():
        match = _GLM_LAYER.match(name)
        if name in whole:
            out[whole[name]] = tensor
        elif name.startswith(GLM_PREFIX):
            out[OFFICIAL_PREFIX + name[len(GLM_PREFIX):]] = tensor
        elif match and match.group(2) in QKV_PARTS:
            layer, part, kind = match.groups()
            fused.setdefault(f"transformer.encoder.layers.{layer}.{QKV}.{kind}", {})[part] = tensor
        elif match and match.group(2) in in_layer:
            layer, module, kind = match.groups()
            out[f"transformer.encoder.layers.{layer}.{in_layer[module]}.{kind}"] = tensor
        else:
            raise ValueError(f"{name}: no official ChatGLM2 name for this tensor")
    for name, parts in fused.items():
        if set(parts) != set(QKV_PARTS):
            raise ValueError(f"{name}: q, k and v are needed to fuse it, got {sorted(parts)}")
        out[name] = torch.cat([parts[p] for p in QKV_PARTS], dim=0)
    return out
