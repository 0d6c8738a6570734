"""Per-GPU memory estimate for training one method (``compare.py --dry_run``), before any weight is loaded.

Sizes are bytes, printed in GiB (2^30 bytes: what ``torch.cuda.max_memory_allocated`` and nvidia-smi count, and what
``train_summary.json``'s ``peak_mem_gb`` holds). Symbols: b micro-batch, s = max_len (a batch may be padded to the
longest allowed sequence), h hidden size, f MLP inner size, a attention heads, L layers, V vocabulary, P_t trainable
parameters, N world size (GPUs), p P-Tuning prefix length.

1. Weights, exact, counted on the model built on the meta device: 2 bytes per float parameter (fp16 training;
   DeepSpeed casts the LoRA adapters to fp16 too); an INT4/INT8 base stores its layer matrices as int8 tensors
   (1 byte per element; INT4 packs two weights per element) plus fp16 scales (2 bytes per output row).
   Counted with ``ds_numel`` where a parameter has it (a ZeRO-3 partitioned one, whose local tensor is a slice).
   Stages 0-2 keep a full copy on every GPU. ZeRO-3 keeps 1/N of every parameter (none with ``offload_param``:
   the partitions sit in host memory), the parameters of at most ``stage3_param_persistence_threshold`` elements
   (1e5 by default: biases, norms) whole as well, since they stay gathered, and the parameters gathered for the
   layers being computed: up to ``stage3_max_live_parameters`` (1e9 by default) elements, an upper bound
   reached where the reuse of what was gathered is near (the top layers, from the end of forward into backward).
2. Trainable states, mixed-precision Adam, per trainable parameter: fp16 gradient 2 B + fp32 master copy 4 B +
   Adam m and v 8 B = 14 B (16 B with its fp16 weight, item 1). ZeRO-1 partitions master + m + v (12 B) across N,
   ZeRO-2 and ZeRO-3 also the gradients; stage 0 partitions nothing. ``offload_optimizer`` moves master + m + v
   (and an fp32 copy of the gradient partition) to host memory; the fp16 gradients stay on the GPU. (The seeds
   offloaded the optimizer; our ds_config.json does not, ds_zero3_offload.json does.) ``rank_elements`` is the
   per-rank element count of each part; ``bench/zero_partition.py`` measures the same counts on a DeepSpeed engine.
3. Activations kept for backward, fp16 (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
   Transformer Models", eq. 1 without tensor or sequence parallelism): per layer ``s*b*h*(34 + 5*a*s/h)`` bytes.
   The 34 sbh are attention 11 sbh (QKV input, Q, K, V, softmax-times-V input, output-dropout mask), MLP 19 sbh
   (input 2, h->4h output 8, GeLU output 8, dropout mask 1) and two layernorm inputs 4 sbh; the 5 a s^2 b are the
   softmax output (2), the attention-dropout mask (1) and its output (2). With the MLP's inner size f in place of
   4h the per-layer term is ``s*b*(18h + 4f) + 5*a*s*s_k*b``, the same number for ChatGLM (f = 4h); s_k is the
   key length, s + p with a P-Tuning prefix. Grouped-query attention (ChatGLM2/3, llama, qwen2: K and V of width
   k = key/value heads x head size instead of h) keeps K and V at 2 sbk each instead of 2 sbh: ``14h + 4k`` in place
   of 18h. A gated MLP (SwiGLU: ChatGLM2/3's fused gate/up matrix, llama's gate_proj) keeps the gate and up
   outputs, the activation's output and the product (2 sbf each) instead of the h->f output and the GeLU output:
   8f in place of 4f. So in general ``s*b*(14h + 4k + c*f) + 5*a*s*s_k*b``, c = 4 or 8. Models without dropout
   keep no masks, so for them this stays an upper bound by ~2 sbh + a s s_k b.
   It is an upper bound for our model. Measured with ``saved_activation_bytes`` (one chatglm-6b-sized layer, b = 2,
   s = 768, CPU): a layer whose weights train (freeze) keeps 36 sbh, a LoRA layer 28 sbh, a frozen layer the
   gradient only passes through 24 sbh (a frozen matmul keeps no copy of its input), and SDPA's fused kernels keep
   no [b, a, s, s] tensor, so the 5 a s^2 b term (30 sbh at s = 768) is not spent at all.
   Which layers keep activations: those from the lowest layer where a trainable parameter enters up to the top,
   since nothing below it needs a gradient. Freeze (last N layers trainable) keeps N; LoRA (an adapter in every
   layer), P-Tuning (a prefix into every layer) and embedding (the input end) keep all L. This is read from
   ``requires_grad`` on the meta model, not from the method's name.
   With full activation checkpointing each kept layer stores only its input, 2 sbh, and backward recomputes one
   layer at a time: + one layer's full activations.
4. Loss head: our ChatGLM v1 runs the output layer on the labelled positions only, at most n = max_len -
   max_src_len answer tokens per sequence (assumed all present): ``b * n * V * (2 + 4 + 4)`` bytes for the fp16
   logits, their fp32 copy for the cross-entropy and its fp32 gradient. (The original materialised all [b, s, V]
   logits in fp16 and in fp32, 1.1 GiB at b = 2, s = 768, before the cross-entropy's own fp32 buffers.) The other
   families (transformers' causal-LM loss) compute the logits of every position: n = max_len.
5. A fixed 1 GiB allowance for the CUDA context, cuBLAS workspaces and allocator slack (stated, not measured).

Not modelled: DeepSpeed's communication buckets (reduce/all-gather, with N > 1), the transient fp16 copy of one
dequantized matrix in an INT4/INT8 matmul (0.13 GiB for chatglm-6b's largest), temporary buffers of the optimizer
step, and fragmentation (nvidia-smi shows the allocator's reserved memory, which exceeds the allocated peak).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glmft import families
from glmft.model import build_model, model_path

GIB = 2**30
CONTEXT_BYTES = 1 * GIB


@dataclass(frozen=True)
class Setting:
    """The training shape the estimate is for."""

    batch: int
    max_len: int
    max_src_len: int
    zero_stage: int = 1
    world_size: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    persistence: int = 10**5  # stage3_param_persistence_threshold
    live_params: int = 10**9  # stage3_max_live_parameters


def setting_for(ds_config: dict, batch: int, max_len: int, max_src_len: int, world_size: int) -> Setting:
    """The Setting of a DeepSpeed config (its zero_optimization block) for ``world_size`` ranks."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = {k: zero.get(k, {}).get("device", "none") in ("cpu", "nvme") for k in ("offload_optimizer",
                                                                                     "offload_param")}
    return Setting(batch, max_len, max_src_len, zero.get("stage", 0), world_size, **offloaded,
                   persistence=int(zero.get("stage3_param_persistence_threshold", 10**5)),
                   live_params=int(zero.get("stage3_max_live_parameters", 10**9)))


@dataclass(frozen=True)
class Estimate:
    """One method's parameter counts and memory parts, in bytes."""

    trainable: int
    total: int
    weights: int
    states: int
    layers_kept: int
    activations: int
    activations_ckpt: int
    loss_head: int
    context: int = CONTEXT_BYTES
    host: int = 0  # offloaded to host memory (not in the GPU total)

    def total_bytes(self, checkpointing: bool) -> int:
        acts = self.activations_ckpt if checkpointing else self.activations
        return self.weights + self.states + acts + self.loss_head + self.context


def numel(p: torch.Tensor) -> int:
    """A parameter's full element count, also when ZeRO-3 has partitioned it (its local tensor is then a slice)."""
    return getattr(p, "ds_numel", None) or p.numel()


def weight_bytes(model: nn.Module) -> int:
    """Stored bytes of every parameter: int8 storage as it is, float parameters as fp16."""
    return sum(numel(p) * (1 if p.dtype == torch.int8 else 2) for p in model.parameters())


def rank_elements(sizes: list[tuple[int, bool]], setting: Setting) -> dict[str, float]:
    """Elements one rank holds of each part (module docstring, items 1-2) for parameters given as (numel,
    trainable): the fp32 master copy, Adam's m + v, the gradient, and the weights (without ZeRO-3's gathered
    working set)."""
    stage, n = setting.zero_stage, setting.world_size
    trainable = sum(size for size, grad in sizes if grad)
    master = trainable / (n if stage >= 1 else 1)
    weights = sum(size for size, _ in sizes)
    if stage >= 3:  # a partition of each (padded to a multiple of N); a small one also stays whole once gathered
        weights = sum(math.ceil(size / n) + (size if size <= setting.persistence else 0) for size, _ in sizes)
    return {"master": master, "moments": 2 * master, "grads": trainable / (n if stage >= 2 else 1),
            "weights": weights}


def state_bytes(trainable: int, zero_stage: int, world_size: int) -> int:
    """fp16 gradients + fp32 master weights + Adam m and v, partitioned as ZeRO ``zero_stage`` does."""
    parts = rank_elements([(trainable, True)], Setting(1, 2, 0, zero_stage, world_size))
    return int(2 * parts["grads"] + 4 * (parts["master"] + parts["moments"]))


def gpu_weight_bytes(model: nn.Module, setting: Setting) -> tuple[int, int]:
    """(bytes of weights on one GPU, bytes offloaded to host memory), module docstring item 1."""
    sizes = [(numel(p), 1 if p.dtype == torch.int8 else 2) for p in model.parameters()]
    if setting.zero_stage < 3:
        return sum(size * b for size, b in sizes), 0
    small = sum(size * b for size, b in sizes if size <= setting.persistence)
    shards = sum(math.ceil(size / setting.world_size) * b for size, b in sizes)
    live = min(2 * setting.live_params, sum(size * b for size, b in sizes if size > setting.persistence))
    return (small + live, shards) if setting.offload_param else (small + shards + live, 0)


def layers_with_activations(model: nn.Module) -> int:
    """Layers from the lowest one a trainable parameter feeds into, up to the top."""
    family = families.of_model(model)
    num_layers = family.num_layers(model.config)
    layer = re.compile(re.escape(family.layers_path(unwrapped(model))) + r"\.(\d+)\.")
    below = {id(model.get_input_embeddings().weight)}  # the input end, under every layer
    lowest = num_layers
    for name, p in model.named_parameters():
        if p.requires_grad:
            found = layer.search(name)
            if found:
                lowest = min(lowest, int(found.group(1)))
            elif id(p) in below or "prefix_encoder" in name or "prompt_encoder" in name:  # feeds every layer
                lowest = 0
            # anything else outside the layers (final norm, an untied output layer) sits above them all
    return num_layers - lowest


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (whose parameter names keep the inner model's as a suffix)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gated_mlp(model: nn.Module) -> bool:
    """Whether the MLP is gated (SwiGLU: a gate matrix beside the up-projection)."""
    return any(".mlp." in name and "gate" in name for name, _ in model.named_parameters())


def kv_width(config) -> int:
    """Width of the keys (and of the values): key/value heads x head size; the hidden size without GQA."""
    h, a = config.hidden_size, config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None)
    head = getattr(config, "head_dim", None) or h // a
    return groups * head if groups else h


def layer_activation_bytes(config, batch: int, seq: int, gated: bool = False) -> int:
    """One layer's activations kept for backward, fp16 (module docstring, item 3)."""
    h, a = config.hidden_size, config.num_attention_heads
    f = (getattr(config, "inner_hidden_size", None) or getattr(config, "intermediate_size", None) or 4 * h)
    keys = seq + (getattr(config, "pre_seq_len", None) or 0)
    return seq * batch * (14 * h + 4 * kv_width(config) + (8 if gated else 4) * f) + 5 * a * seq * keys * batch


def estimate(model: nn.Module, setting: Setting) -> Estimate:
    """Memory per GPU for training ``model`` (tuner applied, built on the meta device) in ``setting``."""
    config, b = model.config, setting.batch
    s = setting.max_len + (getattr(config, "num_virtual_tokens", None) or 0)  # input-level virtual tokens lengthen it
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    kept = layers_with_activations(model)
    per_layer = layer_activation_bytes(config, b, s, gated_mlp(model))
    answer_only = families.of_model(model).LOSS_LOGITS == "answer"
    weights, host = gpu_weight_bytes(model, setting)
    states = state_bytes(trainable, setting.zero_stage, setting.world_size)
    if setting.offload_optimizer:  # 16 B per partitioned element go to the host: fp32 master, m, v and gradient
        parts = rank_elements([(trainable, True)], setting)
        states, host = int(2 * parts["grads"]), host + int(16 * parts["master"])
    return Estimate(
        trainable=trainable, total=total, weights=weights, states=states, host=host, layers_kept=kept,
        activations=kept * per_layer,
        activations_ckpt=kept * 2 * s * b * config.hidden_size + (per_layer if kept else 0),
        loss_head=b * (setting.max_len - setting.max_src_len if answer_only else s) * config.vocab_size * (2 + 4 + 4),
    )


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """What one forward of ``model`` on ``batch`` really keeps for backward, in fp16 bytes (fp32 tensors count
    half): every distinct storage autograd saves, the parameters' excluded. A check on item 3 that runs anywhere."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes() // (2 if t.dtype == torch.float32 else 1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss  # keeps the graph, so no saved storage is freed and reused while counting
    del loss
    return sum(saved.values())


def report(model_dir: str, methods: list[tuple[str, Any, Any]], quantization_bit: int, setting: Setting) -> str:
    """The estimate table for (name, tuner, tuner args) tuples: each model built from ``model_dir`` (a directory or
    its config.json) on the meta device with the tuner applied; a method that cannot be built gets its error."""
    rows: list[tuple[str, Estimate | str]] = []
    path = model_path(model_dir)
    stored = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_bit", 0)
    if quantization_bit and stored and stored != quantization_bit:  # the loader refuses this too
        raise ValueError(f"{model_dir} stores INT{stored} weights: it cannot be estimated with --quantization_bit "
                         f"{quantization_bit} (leave it at 0)")
    for name, tuner, method_args in methods:
        overrides = tuner.model_overrides(method_args)
        if quantization_bit:  # only when asked: 0 would turn an INT4 checkpoint's config into a float model
            overrides = {**overrides, "quantization_bit": quantization_bit}
        try:
            model = build_model(model_dir, torch.float16, overrides, True)
            rows.append((name, estimate(tuner.apply(model, method_args), setting)))
        except ValueError as err:  # e.g. freeze's default 5 layers on a 2-layer model
            rows.append((name, str(err)))
    bits = quantization_bit or stored
    return f"{model_dir} ({f'INT{bits}' if bits else 'fp16'} base)\n{markdown_table(rows, setting)}"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def markdown_table(rows: list[tuple[str, Estimate | str]], setting: Setting) -> str:
    """One row per method: parameters, then the memory parts and the totals without / with checkpointing (GiB)."""
    head = ["method", "trainable", "total params", "trainable %", "weights", "train states", "layers kept",
            "activations", "act. (ckpt)", "loss head", "context", "total GiB", "total (ckpt)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, est in rows:
        if isinstance(est, str):
            lines.append(f"| {name} | error: {est} |" + " |" * (len(head) - 2))
            continue
        cells = [name, f"{est.trainable:,}", f"{est.total / 1e9:.3f}B", f"{100 * est.trainable / est.total:.4f}%",
                 _gib(est.weights), _gib(est.states), str(est.layers_kept), _gib(est.activations),
                 _gib(est.activations_ckpt), _gib(est.loss_head), _gib(est.context),
                 f"**{_gib(est.total_bytes(False))}**", f"**{_gib(est.total_bytes(True))}**"]
        lines.append("| " + " | ".join(cells) + " |")
    offload = [k for k in ("offload_optimizer", "offload_param") if getattr(setting, k)]
    note = (f"Per GPU, GiB: batch {setting.batch}, max_len {setting.max_len}, max_src_len {setting.max_src_len}, "
            f"fp16, ZeRO-{setting.zero_stage}{' with ' + ' and '.join(offload) if offload else ''}, "
            f"{setting.world_size} GPU(s); assumptions in glmft/estimate.py.")
    host = [f"{name} {_gib(est.host)}" for name, est in rows if not isinstance(est, str) and est.host]
    tail = ["", "Host memory per rank for what is offloaded, GiB: " + ", ".join(host)] if host else []
    return "\n".join([note, "", *lines, *tail])
