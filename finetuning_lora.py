"""LoRA fine-tuning of ChatGLM-6B: PEFT low-rank adapters on query_key_value, the base frozen.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_lora.py --model_dir /models/chatglm-6b --lora_r 8

On a CPU, or without the launcher for debugging::

    python finetuning_lora.py --model_dir tiny --max_steps 20

Options: `python finetuning_lora.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/lora); `python predict_lora.py --ckpt_dir output/lora` scores them.
"""

from glmft import args, train
from glmft.tuners import lora

if __name__ == "__main__":
    train.run(*args.parse(lora), lora)
