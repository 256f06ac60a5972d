"""The paper's zero-shot table with lm-evaluation-harness, from local task files or the Hub.

Prompts and scoring are lm-eval's own: every task is a two-line YAML that ``include:``s lm-eval's task file and
overrides only what must change — the data source (``dataset_path: json`` or ``parquet`` with ``data_files``; the
split lm-eval evaluates is the only one declared, so no few-shot sampler looks for a train split) and the metric
list (``acc`` and ``acc_norm`` for every multiple-choice task; lm-eval's SIQA, BoolQ and WinoGrande report only
``acc``). The table uses ``acc_norm`` where lm-eval's task reports it (ARC, PIQA, HellaSwag, OBQA) and for SIQA,
``acc`` for BoolQ and WinoGrande, as the paper does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_mobilellm.errors import EvaluationError
from megatron_mobilellm.evaluation.reference import COLUMNS, PAPER_ROWS


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Our name: ``--tasks`` entry and the data file's stem (``--data-dir/NAME.jsonl``)."""
    lm_eval_task: str
    """lm-eval's task name."""
    task_file: Path
    """lm-eval's YAML that the generated task includes."""
    column: str
    """Header in the printed table."""
    table_metric: str = "acc"
    """The metric the table shows."""


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ModuleNotFoundError as e:  # the first use of lm-eval: say which extra brings it
        raise EvaluationError(f"zero-shot tasks run in lm-evaluation-harness, but {e.name} is not installed: "
                              "pip install -e '.[eval]' (--tasks)") from None

    return Path(lm_eval.tasks.__file__).parent


def paper_tasks() -> dict[str, TaskSpec]:
    """The eight tasks of the paper's table, in its column order (task files as laid out in lm-eval 0.4.13)."""
    root = _lm_eval_tasks_dir()
    rows = [("arc_easy", "arc_easy", "arc/arc_easy.yaml", "acc_norm"),
            ("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", "acc_norm"),
            ("boolq", "boolq", "super_glue/boolq/default.yaml", "acc"),
            ("piqa", "piqa", "piqa/piqa.yaml", "acc_norm"),
            ("siqa", "social_iqa", "siqa/siqa.yaml", "acc_norm"),
            ("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "acc_norm"),
            ("openbookqa", "openbookqa", "openbookqa/openbookqa.yaml", "acc_norm"),
            ("winogrande", "winogrande", "winogrande/default.yaml", "acc")]
    return {name: TaskSpec(name, task, root / path, column, metric)
            for (name, task, path, metric), column in zip(rows, COLUMNS)}


DEFAULT_TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "openbookqa", "winogrande")


def resolve_tasks(names: list[str]) -> list[TaskSpec]:
    """Specs for ``--tasks``: the paper's eight by our or lm-eval's name, any other multiple-choice lm-eval task by
    its name (scored by ``acc_norm`` in the table)."""
    known = paper_tasks()
    by_lm_eval = {s.lm_eval_task: s for s in known.values()}
    specs, others = [], []
    for name in names:
        spec = known.get(name) or by_lm_eval.get(name)
        if spec is None:
            others.append(name)
        elif spec not in specs:
            specs.append(spec)
    if others:
        from lm_eval.tasks import TaskManager

        index = TaskManager().task_index  # scans all of lm-eval's task files: only when needed
        for name in others:
            entry = index.get(name)
            if entry is None or entry.yaml_path is None or entry.kind.name != "TASK":
                raise EvaluationError(f"unknown lm-eval task {name!r} (--tasks)")
            if (entry.cfg or {}).get("output_type") != "multiple_choice":
                raise EvaluationError(f"lm-eval task {name!r} is not multiple-choice: the table reports "
                                      "accuracies (--tasks)")
            specs.append(TaskSpec(name, name, Path(entry.yaml_path), name, "acc_norm"))
    return specs


def data_file(spec: TaskSpec, data_dir: Path) -> Path:
    """``DIR/NAME.jsonl`` (or ``.json``/``.parquet``, or named after lm-eval's task)."""
    stems = dict.fromkeys([spec.name, spec.lm_eval_task])
    for stem in stems:
        for ext in (".jsonl", ".json", ".parquet"):
            if (data_dir / f"{stem}{ext}").is_file():
                return data_dir / f"{stem}{ext}"
    expected = " or ".join(f"{spec.name}{ext}" for ext in (".jsonl", ".parquet"))
    raise EvaluationError(f"no data file for task {spec.name} (expected {expected}) ({data_dir})")


def task_config(spec: TaskSpec, data: Path | None) -> dict:
    """The generated YAML: lm-eval's task, with local data and both accuracy metrics."""
    from lm_eval.tasks._yaml_loader import load_yaml

    base = load_yaml(spec.task_file, resolve_func=False)
    cfg: dict = {"include": str(spec.task_file), "task": spec.lm_eval_task}
    if base.get("output_type") == "multiple_choice":
        cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in ("acc", "acc_norm")]
    if data is not None:
        split = base.get("test_split") or base.get("validation_split")
        cfg.update(dataset_path="parquet" if data.suffix == ".parquet" else "json", dataset_name=None,
                   dataset_kwargs={"data_files": {split: str(data)}}, training_split=None, validation_split=None,
                   test_split=None, fewshot_split=None)
        cfg["test_split" if base.get("test_split") else "validation_split"] = split
    return cfg


def _source(spec: TaskSpec, data: Path | None) -> str:
    return str(data) if data is not None else f"lm-eval task {spec.lm_eval_task}"


def _check_rows(task, spec: TaskSpec, data: Path | None, limit: int | None) -> None:
    """Every row renders with lm-eval's templates and names a valid answer: a wrong schema fails here, by row."""
    where = _source(spec, data)
    docs = task.eval_docs
    if len(docs) == 0:
        raise EvaluationError(f"task {spec.name} has no rows ({where})")
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        try:
            text, choices = task.doc_to_text(doc), task.doc_to_choice(doc)
            gold = text if task.multiple_input else task.doc_to_target(doc)
            ok = gold in choices if isinstance(gold, str) else 0 <= int(gold) < len(choices)
        except Exception as e:  # lm-eval's templates raise whatever the row's shape provokes
            raise EvaluationError(f"row {i + 1} does not have task {spec.name}'s schema ({type(e).__name__}: "
                                  f"{e}; the row has {', '.join(sorted(doc))}) ({where})") from None
        if not ok:
            raise EvaluationError(f"row {i + 1}: answer {gold!r} is not one of task {spec.name}'s "
                                  f"{len(choices)} choices ({where})")


@dataclass
class TaskResult:
    spec: TaskSpec
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    """``acc``, ``acc_norm`` and their ``*_stderr`` as lm-eval reports them (fractions)."""

    @property
    def score(self) -> float:
        return self.metrics[self.spec.table_metric]


def load_tasks(specs: list[TaskSpec], data_dir: Path | None, workdir: Path, limit: int | None) -> list:
    """lm-eval Task objects, each checked against its data file before anything runs."""
    import datasets
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices; the request progress bar stays
    datasets.disable_progress_bars()
    workdir.mkdir(parents=True, exist_ok=True)
    files = {s.name: data_file(s, data_dir) if data_dir is not None else None for s in specs}
    for spec in specs:
        (workdir / f"{spec.name}.yaml").write_text(yaml.safe_dump(task_config(spec, files[spec.name])))
    manager = TaskManager(include_path=str(workdir), include_defaults=False)
    tasks = []
    for spec in specs:
        try:
            task = manager.load([spec.lm_eval_task])["tasks"][spec.lm_eval_task]
        except Exception as e:  # datasets/lm-eval report unreadable files and schema mismatches in many types
            what = "unreadable or not in the task's Hub schema" if files[spec.name] else "cannot be loaded"
            raise EvaluationError(f"task {spec.name}: {what} ({type(e).__name__}: {e}) "
                                  f"({_source(spec, files[spec.name])})") from None
        _check_rows(task, spec, files[spec.name], limit)
        tasks.append(task)
    return tasks


def evaluate(model, tokenizer, specs: list[TaskSpec], tasks: list, batch_size: int,
             limit: int | None) -> list[TaskResult]:
    """Zero-shot scores of a loaded transformers model on ``load_tasks``' tasks, through lm-eval's HFLM."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # The tasks arrive loaded; left without a manager, simple_evaluate would build one that reads all of lm-eval's
    # ~14,000 task files (~10 s) only to log where each task came from.
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False))
    results = []
    for spec in specs:
        row = out["results"][spec.lm_eval_task]
        metrics = {k.split(",")[0]: float(v) for k, v in row.items()
                   if "," in k and isinstance(v, (int, float))}
        results.append(TaskResult(spec, int(out["n-samples"][spec.lm_eval_task]["effective"]), metrics))
    return results


def average(results: list[TaskResult]) -> float:
    return sum(r.score for r in results) / len(results)


def format_table(results: list[TaskResult], label: str, reference: str | None) -> str:
    """Markdown: this model's row (%), the paper's row for the same preset over the same columns, and the detail."""
    cols = [r.spec.column for r in results]
    lines = ["| model | " + " | ".join(cols) + " | avg |", "|---" * (len(cols) + 2) + "|",
             f"| {label} | " + " | ".join(f"{100 * r.score:.1f}" for r in results)
             + f" | {100 * average(results):.1f} |"]
    if reference is not None:
        paper = dict(zip(COLUMNS, PAPER_ROWS[reference]))
        if all(c in paper for c in cols):
            ref = [paper[c] for c in cols]
            lines.append(f"| {reference} (paper) | " + " | ".join(f"{v:.1f}" for v in ref)
                         + f" | {sum(ref) / len(ref):.1f} |")
    lines += ["", "| task | lm-eval task | rows | acc | acc_norm | table uses |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for m in ("acc", "acc_norm"):
            v, err = r.metrics.get(m), r.metrics.get(f"{m}_stderr")
            cells.append("—" if v is None else f"{100 * v:.1f} ± {100 * err:.1f}" if err is not None
                         else f"{100 * v:.1f}")
        lines.append(f"| {r.spec.name} | {r.spec.lm_eval_task} | {r.samples} | {cells[0]} | {cells[1]} | "
                     f"{r.spec.table_metric} |")
    return "\n".join(lines)


def results_dict(results: list[TaskResult], reference: str | None) -> dict:
    """The JSON form: per task both accuracies (fractions) and the one the table uses, the average, the paper."""
    out = {"tasks": {r.spec.name: {"lm_eval_task": r.spec.lm_eval_task, "column": r.spec.column, "rows": r.samples,
                                   "table_metric": r.spec.table_metric, "score": r.score, **r.metrics}
                     for r in results},
           "average": average(results)}
    if reference is not None:
        out["paper"] = {c: v / 100 for c, v in zip(COLUMNS, PAPER_ROWS[reference])}
    return out


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
