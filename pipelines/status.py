"""`crossmodal status`: recent pipeline runs and the state of each of their stages, from MLflow."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from pipelines.lineage import KIND


def recent_pipelines(uri: str, limit: int = 10) -> list[dict]:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    parents = client.search_runs(
        experiments, f"tags.`{KIND}` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=limit
    )
    rows = []
    for run in parents:
        children = client.search_runs(
            [run.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        stages = {c.data.tags.get("crossmodal.stage", c.info.run_name): c for c in children}
        plan = [s for s in run.data.tags.get("crossmodal.plan", "").split(",") if s] or list(stages)
        rows.append(
            {
                "run_id": run.info.run_id,
                "name": run.data.tags.get("crossmodal.pipeline", run.info.run_name),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000)),
                "status": run.info.status,
                "stages": [(name, stage_state(stages.get(name))) for name in plan],
            }
        )
    return rows


def stage_state(run) -> str:
    if run is None:
        return "not run"
    state = run.data.tags.get("crossmodal.state", run.info.status.lower())
    seconds = run.data.metrics.get("stage_seconds")
    return f"{state} {seconds:.1f}s" if state == "ran" and seconds is not None else state


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no pipeline runs yet"
    lines = [f"{'started':19}  {'pipeline':12}  {'status':8}  {'run id':32}  stages"]
    for row in rows:
        stages = ", ".join(f"{name}: {state}" for name, state in row["stages"])
        lines.append(f"{row['started']:19}  {row['name'][:12]:12}  {row['status']:8}  {row['run_id']:32}  {stages}")
    return "\n".join(lines)
