"""Reading and writing ChatGLM2/3 checkpoint directories under the official tensor names.

transformers' loader does the model building (meta device, dtype, device_map, initialising a new prefix encoder);
we hand it the state dict converted tensor by tensor (``convert.official_to_glm``), so its key-renaming internals,
which change between versions, are not needed.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors import safe_open
from transformers import GenerationConfig, GlmForCausalLM, PreTrainedModel

from ..quantization import freeze_quantized
from .convert import GLM_PREFIX, glm_to_official, official_to_glm
from .quantized import quantize_linear, replace_linears

# Arguments that belong to transformers' loader, never to the config.
LOADER_KEYS = ("dtype", "torch_dtype", "device_map", "max_memory", "attn_implementation", "low_cpu_mem_usage",
               "offload_folder", "offload_buffers", "tp_plan", "key_mapping")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")


def checkpoint_files(directory: str) -> list[str]:
    """The weight files of an official or saved directory: an index's shards, else the single file."""
    for index in INDEXES:
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, shard) for shard in shards]
    for single in SINGLE:
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise FileNotFoundError(f"{directory}: no {', '.join(SINGLE + INDEXES)}")


def read_official(directory: str, config) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, converted to Glm names one at a time (a shard is never held twice)."""
    state_dict = {}
    for path in checkpoint_files(directory):
        try:
            if path.endswith(".safetensors"):
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        state_dict.update(official_to_glm(name, f.get_tensor(name), config))
            else:
                shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for name in list(shard):
                    state_dict.update(official_to_glm(name, shard.pop(name), config))
        except ValueError as err:
            raise ValueError(f"{path}: {err} (config.json)") from err
    return state_dict


def split_kwargs(cls, path: str, kwargs: dict):
    """(config with the overrides applied, loader kwargs, bits to quantize a float checkpoint to after loading)."""
    loader = {k: kwargs.pop(k) for k in LOADER_KEYS if k in kwargs}
    for ignored in ("trust_remote_code", "_from_auto", "_from_pipeline", "_commit_hash", "cache_dir", "revision",
                    "local_files_only", "token", "force_download", "proxies", "subfolder", "adapter_kwargs"):
        kwargs.pop(ignored, None)
    config = kwargs.pop("config", None)
    stored_bits = cls.config_class.from_pretrained(path).quantization_bit
    if config is None:
        config, kwargs = cls.config_class.from_pretrained(path, return_unused_kwargs=True, **kwargs)
    else:
        config = copy.deepcopy(config)
        for name in [k for k in kwargs if hasattr(config, k)]:
            setattr(config, name, kwargs.pop(name))
    if kwargs:
        raise TypeError(f"{path}: unknown loading argument(s) {sorted(kwargs)}")
    wanted = config.quantization_bit
    if stored_bits and wanted != stored_bits:
        raise ValueError(f"{path} stores INT{stored_bits} weights: it cannot be loaded with quantization_bit={wanted}")
    config.quantization_bit = stored_bits  # build the layout the file holds; quantize afterwards if asked
    return config, loader, 0 if stored_bits else wanted


def load_official(cls, path, *model_args, **kwargs):
    """See ``ChatGLM2ForCausalLM.from_pretrained``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (ChatGLM2/3 checkpoints load from a local directory)")
    want_info = kwargs.pop("output_loading_info", False)
    tolerate_shapes = kwargs.pop("ignore_mismatched_sizes", False)
    config, loader, quantize_to = split_kwargs(cls, path, kwargs)
    state_dict = read_official(path, config)
    if state_dict and all(k.startswith(GLM_PREFIX) for k in state_dict):
        raise ValueError(f"{path} holds only a P-Tuning v2 prefix encoder: load the base model with pre_seq_len "
                         "(and prefix_projection), then call model.load_prefix_encoder on this directory")
    # transformers' own loader (``cls`` may be a subclass: call the base implementation explicitly); it only logs
    # which tensor is mis-shaped, so it loads tolerantly and we name the tensor below.
    model, info = PreTrainedModel.from_pretrained.__func__(
        cls, None, *model_args, config=config, state_dict=state_dict, output_loading_info=True,
        ignore_mismatched_sizes=True, **loader)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(GLM_PREFIX))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = [] if tolerate_shapes else [f"tensor {m[0]} has shape {tuple(m[1])}, the model expects {tuple(m[2])}"
                                             for m in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        details = [f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected]
        if any(k.startswith(GLM_PREFIX) for k in unexpected):
            details.append("it holds a P-Tuning v2 prefix encoder: pass pre_seq_len (and prefix_projection=True "
                           "if it has prefix_encoder.trans.*)")
        raise ValueError(f"checkpoint {path} does not match its config: " + "; ".join(details + mismatched))
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if quantize_to:
        replace_linears(model, lambda linear: quantize_linear(linear, quantize_to))
        model.config.quantization_bit = quantize_to
    freeze_quantized(model)
    return (model, info) if want_info else model


def save_official(model, save_directory, *args, **kwargs) -> None:
    """``save_pretrained`` with the official names (transformers writes the files, shards and config)."""
    state_dict = kwargs.pop("state_dict", None)
    state_dict = glm_to_official(model.state_dict() if state_dict is None else state_dict)
    GlmForCausalLM.save_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
