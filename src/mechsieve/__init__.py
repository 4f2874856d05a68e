"""mechsieve: curate fine-tuning data by reading the model's own internals.

Importing this package does nothing heavy; the stages live in subpackages (data, models,
capture, features, scorers, select, tokens, train, evaluate, engine, store, report).
"""

__version__ = "0.1.0"
