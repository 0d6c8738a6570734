"""P-Tuning v2 of ChatGLM-6B: train a per-layer key/value prefix, with or without the projection MLP.

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_pt.py --model_dir /models/chatglm-6b --pre_seq_len 16

On a CPU, or without the launcher for debugging::

    python finetuning_pt.py --model_dir tiny --max_steps 20

Options: `python finetuning_pt.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/pt); `python predict_pt.py --ckpt_dir output/pt` scores them.
"""

from glmft import args, train
from glmft.tuners import pt

if __name__ == "__main__":
    train.run(*args.parse(pt), pt)
