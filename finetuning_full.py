"""Full fine-tuning: every parameter trains (ZeRO-3 with offload for large models: ds_zero3_offload.json).

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_full.py --model_dir /models/chatglm-6b

On a CPU, or without the launcher for debugging::

    python finetuning_full.py --model_dir tiny --max_steps 20

Options: `python finetuning_full.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/full); `python predict_full.py --ckpt_dir output/full` scores them.
"""

from glmft import args, train
from glmft.tuners import full

if __name__ == "__main__":
    train.run(*args.parse(full), full)
