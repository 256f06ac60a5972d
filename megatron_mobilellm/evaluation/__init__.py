"""Evaluation of exported models: lm-eval-harness zero-shot tasks from local files, and perplexity."""


class EvaluationError(ValueError):
    """Input that cannot be evaluated as asked (missing file, wrong schema, unsupported export); names the input."""
