"""Benchmarks for keras_lora (run with `python -m benchmarks`)."""
