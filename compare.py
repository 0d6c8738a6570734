"""Compare the fine-tuning methods on one data split with one set of shared options; write the report.

Every method runs through the same scripts the user runs (training launched with ``deepspeed --num_gpus N
finetuning_<method>.py``, prediction with ``predict_<method>.py``, greedy decoding)::

    python compare.py --model_dir /models/chatglm-6b --train_path ../shared/data/spo/spo_0.json \\
        --test_path ../shared/data/spo/spo_1.json --methods freeze,embedding,pt,pt_noproj,lora \\
        --num_train_epochs 5 --train_batch_size 2 --seeds 1,2,3 --output_dir results/

writes results/comparison.{md,csv,json}, loss_curves.png and <metric>_vs_memory.png (f1_vs_memory.png for the
default task), with every run's TensorBoard log under results/runs (``tensorboard --logdir results/runs``).
``--task generation`` or ``--task classification`` chooses what is learnt and scored; ``--base`` adds a row for the
untuned base model; ``--retention_path data/retention.jsonl`` adds the forgetting columns (0 for the base row).
``--dry_run`` prints the parameter table and a memory estimate per method instead. Options: ``python compare.py
--help``. The exit code is 1 when any run failed (after the report, which names each failure, is written).
``--hostfile hostfile --num_gpus 8`` trains on several nodes.
"""

import sys

from glmft import compare

if __name__ == "__main__":
    sys.exit(compare.main(__doc__.splitlines()[0]))
