"""GLUE fine-tuning, grid runs, metrics and reports for distilled students."""
