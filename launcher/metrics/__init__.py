"""What a run reports: metrics.jsonl and console lines in the run directory (runlog.py),
mirrored to Weights & Biases when enabled (tracking.py); `python -m launcher.report` plots them.
"""
