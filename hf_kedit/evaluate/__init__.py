"""Evaluation: benchmark readers, the metrics (each as cmp, tf and gen), edit modes
and side-by-side benchmarks. It only reads a model, with or without packs.

Example:
    >>> from hf_kedit.evaluate import read_cases, evaluate
    >>> cases = read_cases("counterfact", "counterfact.json", limit=100)
    >>> result = evaluate(model, tokenizer, cases, method="lora", mode="single")
"""
from .bench import run_bench
from .cases import Case, Probe
from .datasets import FORMATS, DatasetError, benchmark_facts, read_cases
from .harness import METRICS, MODES, EvalConfig, evaluate, known_methods

__all__ = ["Case", "DatasetError", "EvalConfig", "FORMATS", "METRICS", "MODES", "Probe", "benchmark_facts",
           "evaluate", "known_methods", "read_cases", "run_bench"]
