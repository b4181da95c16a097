"""t5qa: fine-tune, evaluate, serve and tune Hugging Face seq2seq models for question answering.

The Python API is `t5qa.api`, the functions the command line wraps:

    from t5qa import api
    result = api.train(model="t5-small", train="train.json", output="runs/qa")
    print(api.evaluate(result.best_dir, "dev.json").metrics)
    print(api.load_predictor(result.best_dir).answer(context, question).text)

(They are not re-exported here: `t5qa.train` and `t5qa.evaluate` are the modules that do the work.)
"""

__version__ = "0.1.0"
