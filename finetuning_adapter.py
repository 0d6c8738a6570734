"""Adapter fine-tuning of ChatGLM-6B: Houlsby bottlenecks after attention and MLP, the base frozen.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_adapter.py --model_dir /models/chatglm-6b --adapter_size 64

On a CPU, or without the launcher for debugging::

    python finetuning_adapter.py --model_dir tiny --max_steps 20

Options: `python finetuning_adapter.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/adapter); `python predict_adapter.py --ckpt_dir output/adapter` scores them.
"""

from glmft import args, train
from glmft.tuners import adapter

if __name__ == "__main__":
    train.run(*args.parse(adapter), adapter)
