"""t5qa: fine-tune, evaluate, serve and tune Hugging Face seq2seq models for question answering."""

__version__ = "0.1.0"
