"""Predict and score any checkpoint (method, task and settings come from its meta.json), or the untuned base model::

    python predict.py --ckpt_dir output/lora --test_path data/sample_test.jsonl
    python predict.py --model_dir tiny --task classification --test_path data/sample_classification_test.jsonl

Writes predictions.jsonl and metrics.json (the task's scores, per record and for the file; test time) to
<checkpoint>/predict (base model: output/base/predict) unless --output_dir says otherwise.
``--retention_path data/retention.jsonl`` also measures forgetting on general prompts (metrics.json's ``retention``,
per prompt in retention.jsonl). Options: `python predict.py --help`.
"""

from glmft import args, predict

if __name__ == "__main__":
    predict.run(args.parse_one(predict.PredictArgs, __doc__.splitlines()[0]))
