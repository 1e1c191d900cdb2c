"""What the nightly reads from and writes to MLflow: the data the champion was trained on, a
run for a night with nothing new, and the gate's run, report, plot and version tags."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from jobs.gate import Decision, markdown
from pipelines.config import PipelineConfig
from pipelines.config.nightly import higher_is_better
from pipelines.storage import Storage

# The figures the version's tags and the gate run carry (besides every gate/guarded metric).
ALWAYS_SHOWN = ("retrieval.text_to_image.r1", "retrieval.image_to_text.r1", "latency_b32_ms", "size_mb")


def new_source_files(cfg: PipelineConfig, client, champion) -> tuple[list[dict], list[dict] | None]:
    """(files in the source now that the champion was not trained on, the files it was trained
    on); the second is None when that is not recorded (no champion, a model registered by
    hand, a source that moved): then every file counts as new."""
    from pipelines.stages.ingest import StageInputError, source_listing

    listing = source_listing(cfg.ingest)
    if listing is None:
        raise StageInputError(f"ingest.path {cfg.ingest.path}: no such file or folder")
    index = trained_on(client, champion) if champion is not None else None
    if index is None or (index.get("source"), index.get("path")) != (cfg.ingest.source, cfg.ingest.path):
        return listing, None
    known = {(f["path"], f["size"], f["mtime_ns"]) for f in index["files"]}
    return [f for f in listing if (f["path"], f["size"], f["mtime_ns"]) not in known], index["files"]


def trained_on(client, version) -> dict | None:
    """The ingest index of the pipeline run that registered `version` (None if not recorded)."""
    run_id = version.tags.get("crossmodal.pipeline_run")
    if not run_id:
        return None
    experiment = client.get_run(run_id).info.experiment_id
    runs = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`crossmodal.stage` = 'ingest'"
    )
    uri = runs[0].data.tags.get("crossmodal.output_uri") if runs else None
    if not uri or not Storage(uri).exists("source_index.json"):
        return None
    return Storage(uri).read_json("source_index.json")


def quiet_night(cfg: PipelineConfig, date: str, message: str) -> str:
    """A finished run named for the night, so the UI shows that the nightly ran and why it
    trained nothing (with the Ray job's id when it ran as one: `crossmodal submit` finds it)."""
    import os

    from pipelines.lineage import JOB_ID_ENV, KIND, Lineage

    lineage = Lineage(cfg.mlflow)
    run = lineage.client.create_run(
        lineage.experiment_id,
        run_name=f"nightly {date}",
        tags={KIND: "nightly", "crossmodal.nightly": date, "crossmodal.gate.decision": "no new data"}
        | {"mlflow.note.content": message}
        | ({"crossmodal.job_id": os.environ[JOB_ID_ENV]} if os.environ.get(JOB_ID_ENV) else {}),
    )
    lineage.client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def record_gate(client, cfg, parent: str, model: str, version: int, champion, figures: dict, decision: Decision) -> str:
    """The gate run (nested in the night's pipeline run), the version's tags, the parent's
    description; returns the markdown report."""
    from mlflow.entities import Metric, RunTag

    from pipelines.lineage import KIND

    champion_name = f"version {champion.version}" if champion is not None else None
    report = markdown(decision, f"{model} version {version}", champion_name)
    outcome = "promoted" if decision.promote else "kept"
    experiment = client.get_run(parent).info.experiment_id
    run = client.create_run(
        experiment,
        run_name="gate",
        tags={"mlflow.parentRunId": parent, KIND: "gate", "crossmodal.gate.decision": outcome}
        | {"crossmodal.gate.reason": decision.reason[:4900], "mlflow.note.content": report},
    )
    shown = shown_metrics(cfg, figures)
    metrics = [
        Metric(f"{who}.{name}", float(figures[who][name]), 0, 0)
        for who in ("challenger", "champion")
        for name in shown
        if isinstance(figures.get(who, {}).get(name), int | float)
    ]
    client.log_batch(run.info.run_id, metrics=metrics)
    client.log_text(run.info.run_id, report + "\n", "gate.md")
    client.log_text(run.info.run_id, json.dumps(figures, indent=2, default=str), "figures.json")
    rows = [vars(check) for check in decision.checks]
    if rows:
        client.log_table(run.info.run_id, {k: [r[k] for r in rows] for k in rows[0]}, "gate_checks.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot = draw(figures, shown, Path(tmp) / "gate.png")
        if plot is not None:
            client.log_artifact(run.info.run_id, str(plot), "plots")
    client.set_terminated(run.info.run_id, "FINISHED")
    tags = [RunTag("crossmodal.gate.decision", outcome), RunTag("mlflow.note.content", report)]
    client.log_batch(parent, tags=tags)
    version_tags = {"crossmodal.gate": outcome, "crossmodal.gate.reason": decision.reason[:4900]}
    version_tags |= {
        "crossmodal.gate.run": run.info.run_id,
        "crossmodal.benchmark": figures["benchmark"]["content_hash"],
    }
    version_tags |= {f"benchmark.{n}": f"{figures['challenger'][n]:.4g}" for n in shown if n in figures["challenger"]}
    for key, value in version_tags.items():
        client.set_model_version_tag(model, str(version), key, value)
    return report


def shown_metrics(cfg: PipelineConfig, figures: dict) -> list[str]:
    names = [*cfg.nightly.gate.metrics, *cfg.nightly.gate.guarded, *ALWAYS_SHOWN]
    present = set(figures.get("challenger", {})) | set(figures.get("champion", {}))
    return [n for n in dict.fromkeys(names) if n in present]


def draw(figures: dict, names: list[str], path: Path) -> Path | None:
    """Champion and challenger side by side on each figure the gate looked at, as a ratio to
    the champion (1.0 = the same), so recall and latency share one axis."""
    if "champion" not in figures or not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = []
    for name in names:
        old, new = figures["champion"].get(name), figures["challenger"].get(name)
        ratios.append(new / old if old and new is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    better = [(r >= 1) == higher_is_better(n) for n, r in zip(names, ratios, strict=True)]
    ax.barh(names, ratios, color=["tab:green" if b else "tab:red" for b in better])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("challenger / champion (on the frozen benchmark)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
