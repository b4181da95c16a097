"""`python -m t5qa` (also what `accelerate launch -m t5qa train ...` runs)."""

from t5qa.cli import entry

entry()
