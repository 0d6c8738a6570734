"""BitFit fine-tuning of ChatGLM-6B: only the existing biases train, everything else frozen.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_bitfit.py --model_dir /models/chatglm-6b

On a CPU, or without the launcher for debugging::

    python finetuning_bitfit.py --model_dir tiny --max_steps 20

Options: `python finetuning_bitfit.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/bitfit); `python predict_bitfit.py --ckpt_dir output/bitfit` scores them.
"""

from glmft import args, train
from glmft.tuners import bitfit

if __name__ == "__main__":
    train.run(*args.parse(bitfit), bitfit)
