"""Question-answer data: read any format into `QAExample` records, clean them, split them by context.

The rooms, in the order data flows through them:
- `records`: the `QAExample` record, answer-cell parsing, the column mapping of flat records, `write_jsonl`;
- `readers`: format detection and one reader per format (`load_examples`);
- `clean`: normalisation, repairs, drops and flags with a `CleaningReport` (`load_dataset` = read + clean), and
  `load_for_evaluation`, which drops nothing;
- `split`: the grouped train/validation/test split (`split_examples`).
"""

from t5qa.data.clean import CleaningReport, clean_examples, load_dataset, load_for_evaluation, require_inputs
from t5qa.data.readers import detect_format, load_examples, sample_data_path
from t5qa.data.records import DEFAULT_COLUMNS, FORMATS, QAExample, write_jsonl
from t5qa.data.split import context_key, split_examples

__all__ = [
    "DEFAULT_COLUMNS", "FORMATS", "CleaningReport", "QAExample", "clean_examples", "context_key", "detect_format",
    "load_dataset", "load_examples", "load_for_evaluation", "require_inputs", "sample_data_path",
    "split_examples", "write_jsonl",
]
