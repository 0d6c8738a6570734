"""Predict and score an ia3 checkpoint (settings come from its meta.json; nothing to re-type)::

    python predict_ia3.py --ckpt_dir output/ia3 --test_path data/sample_test.jsonl

Writes predictions.jsonl and metrics.json (the scores of the task it learnt, per record and for the file; test
time) to <checkpoint>/predict unless --output_dir says otherwise. Options: `python predict_ia3.py --help`.
"""

from glmft import args, predict
from glmft.tuners import ia3

if __name__ == "__main__":
    predict.run(args.parse_one(predict.PredictArgs, __doc__.splitlines()[0]), ia3)
