"""Fine-tuning with any method, named on the command line (the same as ``finetuning_<method>.py``)::

    CUDA_VISIBLE_DEVICES=0 deepspeed finetune.py --method lora --model_dir /models/chatglm-6b --lora_r 8
    python finetune.py --method freeze --model_dir mini --num_trainable_layers 2 --max_steps 20
    python finetune.py --method pt --dry_run --model_dir ../shared/fixtures/configs/chatglm2-6b/config.json

Checkpoints record their method in meta.json, so ``python predict.py --ckpt_dir output/<method>`` scores any of
them. ``python finetune.py --method NAME --help`` lists the shared options and that method's.
"""

import sys

from glmft import args, train
from glmft.tuners import TUNERS

if __name__ == "__main__":
    method, rest = args.parse_method(sys.argv[1:], list(TUNERS))
    tuner = TUNERS[method]
    train.run(*args.parse(tuner, rest), tuner)
