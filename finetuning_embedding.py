"""Embedding fine-tuning of ChatGLM-6B: train only the word embeddings (tied to the output layer).

Launch (one GPU; --num_gpus N for data parallel)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetuning_embedding.py --model_dir /models/chatglm-6b

On a CPU, or without the launcher for debugging::

    python finetuning_embedding.py --model_dir tiny --max_steps 20

Options: `python finetuning_embedding.py --help`. Checkpoints (trainable weights + meta.json) and TensorBoard runs go to
--output_dir (default output/embedding); `python predict_embedding.py --ckpt_dir output/embedding` scores them.
"""

from glmft import args, train
from glmft.tuners import embedding

if __name__ == "__main__":
    train.run(*args.parse(embedding), embedding)
