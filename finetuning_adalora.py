"""AdaLoRA fine-tuning of ChatGLM-6B: LoRA whose rank budget is reallocated between matrices while training.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_adalora.py --model_dir /models/chatglm-6b --init_r 12 --target_r 8

On a CPU, or without the launcher for debugging::

    python finetuning_adalora.py --model_dir tiny --max_steps 20

Options: `python finetuning_adalora.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/adalora); `python predict_adalora.py --ckpt_dir output/adalora` scores them.
"""

from glmft import args, train
from glmft.tuners import adalora

if __name__ == "__main__":
    train.run(*args.parse(adalora), adalora)
