"""(IA)^3 fine-tuning of ChatGLM-6B: PEFT rescaling vectors on query_key_value and dense_4h_to_h.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_ia3.py --model_dir /models/chatglm-6b

On a CPU, or without the launcher for debugging::

    python finetuning_ia3.py --model_dir tiny --max_steps 20

Options: `python finetuning_ia3.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/ia3); `python predict_ia3.py --ckpt_dir output/ia3` scores them.
"""

from glmft import args, train
from glmft.tuners import ia3

if __name__ == "__main__":
    train.run(*args.parse(ia3), ia3)
