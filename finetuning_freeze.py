"""Freeze fine-tuning of ChatGLM-6B: train the last N layers (default 5), the rest frozen.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_freeze.py --model_dir /models/chatglm-6b

On a CPU, or without the launcher for debugging::

    python finetuning_freeze.py --model_dir tiny --max_steps 20

Options: `python finetuning_freeze.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/freeze); `python predict_freeze.py --ckpt_dir output/freeze` scores them.
"""

from glmft import args, train
from glmft.tuners import freeze

if __name__ == "__main__":
    train.run(*args.parse(freeze), freeze)
