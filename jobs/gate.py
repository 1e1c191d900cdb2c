"""The promotion gate: does the challenger replace the champion?

    decision = decide(challenger_figures, champion_figures, cfg.nightly.gate)
    decision.promote, decision.reason, markdown(decision)

Each check is MLflow's own (`mlflow.validate_evaluation_results` with one `MetricThreshold`),
run one metric at a time so the report can say which check failed and by how much:
- a gate metric must beat the champion by at least its margin (`min_absolute_change`): a tie,
  or a win smaller than the margin, is no win;
- a guarded metric may be worse by at most its tolerance (a `threshold` set from the
  champion's value: relative for cost figures, absolute for the rest).
A gate metric neither model has (the data has no audio, say) is skipped and said; one only the
champion has fails. With no champion yet there is nothing to beat: the challenger is promoted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipelines.config.nightly import COST_FIGURES, GateConfig, higher_is_better

# MLflow logs two INFO lines per validation; the gate runs one per check and prints its own table.
logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)


@dataclass
class Check:
    metric: str
    role: str  # "gate" (must win by the margin) or "guarded" (may lose by the tolerance)
    challenger: float | None
    champion: float | None
    required: str  # the condition in words, e.g. ">= 0.912" or "<= 41.3"
    passed: bool | None  # None: skipped (neither model has the metric)


@dataclass
class Decision:
    promote: bool
    reason: str
    checks: list[Check] = field(default_factory=list)


def decide(challenger: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig) -> Decision:
    if champion is None:
        return Decision(True, "no champion yet: the first model is promoted (nothing to beat)")
    checks = [win_check(m, margin, challenger, champion) for m, margin in cfg.metrics.items()]
    checks += [guard_check(m, tolerance, challenger, champion) for m, tolerance in cfg.guarded.items()]
    decided = [c for c in checks if c.role == "gate" and c.passed is not None]
    if not decided:
        return Decision(False, "kept: none of the gate metrics was measured on the benchmark", checks)
    failed = [c for c in checks if c.passed is False]
    if failed:
        return Decision(False, "kept: " + "; ".join(why(c) for c in failed), checks)
    wins = ", ".join(f"{c.metric} {c.champion:.4g} -> {c.challenger:.4g}" for c in decided)
    return Decision(True, f"promoted: better on every gate metric ({wins}) and no guarded metric regressed", checks)


def win_check(metric: str, margin: float, challenger: dict, champion: dict) -> Check:
    from mlflow.models import MetricThreshold

    new, old = challenger.get(metric), champion.get(metric)
    higher = higher_is_better(metric)
    if new is None or old is None:
        passed = None if new is None and old is None else False
        return Check(metric, "gate", new, old, "measured by both models", passed)
    required = f"{'>=' if higher else '<='} {old + margin if higher else old - margin:.4g}"
    threshold = MetricThreshold(min_absolute_change=margin, greater_is_better=higher)
    return Check(metric, "gate", new, old, required, passes(metric, threshold, new, old))


def guard_check(metric: str, tolerance: float, challenger: dict, champion: dict) -> Check:
    from mlflow.models import MetricThreshold

    new, old = challenger.get(metric), champion.get(metric)
    if new is None or old is None:
        # Nothing to regress from passes; a figure the challenger lacks cannot be checked.
        passed = None if new is None and old is None else new is not None
        return Check(metric, "guarded", new, old, "measured by both models", passed)
    higher = higher_is_better(metric)
    slack = abs(old) * tolerance if metric in COST_FIGURES else tolerance
    limit = old - slack if higher else old + slack
    threshold = MetricThreshold(threshold=limit, greater_is_better=higher)
    return Check(
        metric, "guarded", new, old, f"{'>=' if higher else '<='} {limit:.4g}", passes(metric, threshold, new, old)
    )


def passes(metric: str, threshold, challenger: float, champion: float) -> bool:
    import mlflow
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    try:
        mlflow.validate_evaluation_results(
            {metric: threshold},
            EvaluationResult({metric: float(challenger)}, {}),
            EvaluationResult({metric: float(champion)}, {}),
        )
    except ModelValidationFailedException:
        return False
    return True


def why(check: Check) -> str:
    if check.challenger is None:
        return f"{check.metric} not measured for the challenger"
    if check.role == "gate":
        return f"{check.metric} {check.challenger:.4g} vs champion {check.champion:.4g} (needs {check.required})"
    return (
        f"{check.metric} regressed: {check.challenger:.4g} vs champion {check.champion:.4g} (allowed {check.required})"
    )


def markdown(decision: Decision, challenger: str, champion: str | None) -> str:
    lines = [
        f"**{'PROMOTED' if decision.promote else 'NOT PROMOTED'}**: {decision.reason}",
        "",
        f"challenger: {challenger}  ",
        f"champion: {champion or 'none'}",
    ]
    if decision.checks:
        lines += ["", "| metric | role | champion | challenger | required | result |", "|---|---|---|---|---|---|"]
        for c in decision.checks:
            result = {True: "pass", False: "**FAIL**", None: "skipped"}[c.passed]
            lines.append(
                f"| {c.metric} | {c.role} | {fmt(c.champion)} | {fmt(c.challenger)} | {c.required} | {result} |"
            )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
