"""Evaluation of exported models: lm-eval-harness zero-shot tasks from local files, and perplexity."""
