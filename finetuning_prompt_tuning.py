"""Prompt tuning of ChatGLM-6B: trained virtual token embeddings before every input, the model frozen.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_prompt_tuning.py --model_dir /models/chatglm-6b --num_virtual_tokens 16

On a CPU, or without the launcher for debugging::

    python finetuning_prompt_tuning.py --model_dir tiny --max_steps 20

Options: `python finetuning_prompt_tuning.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard
runs go to --output_dir (default output/prompt_tuning); `python predict_prompt_tuning.py --ckpt_dir
output/prompt_tuning` scores them.
"""

from glmft import args, train
from glmft.tuners import prompt_tuning

if __name__ == "__main__":
    train.run(*args.parse(prompt_tuning), prompt_tuning)
