"""Predict and score a p_tuning checkpoint (settings come from its meta.json; nothing to re-type)::

    python predict_p_tuning.py --ckpt_dir output/p_tuning --test_path data/sample_test.jsonl

Writes predictions.jsonl and metrics.json (the scores of the task it learnt, per record and for the file; test
time) to <checkpoint>/predict unless --output_dir says otherwise. Options: `python predict_p_tuning.py --help`.
"""

from glmft import args, predict
from glmft.tuners import p_tuning

if __name__ == "__main__":
    predict.run(args.parse_one(predict.PredictArgs, __doc__.splitlines()[0]), p_tuning)
