"""P-Tuning (v1) of ChatGLM-6B: virtual tokens at the input produced by a trained prompt encoder (MLP or LSTM).

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_p_tuning.py --model_dir /models/chatglm-6b --encoder_type mlp

On a CPU, or without the launcher for debugging::

    python finetuning_p_tuning.py --model_dir tiny --max_steps 20

Options: `python finetuning_p_tuning.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/p_tuning); `python predict_p_tuning.py --ckpt_dir output/p_tuning` scores them.
"""

from glmft import args, train
from glmft.tuners import p_tuning

if __name__ == "__main__":
    train.run(*args.parse(p_tuning), p_tuning)
