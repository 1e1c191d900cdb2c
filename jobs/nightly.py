"""The nightly retrain: new data -> the pipeline -> the frozen benchmark -> the promotion gate.

    crossmodal nightly CONFIG [--set k=v ...]        (also: python -m jobs.nightly CONFIG)

1. Takes the nightly lock (jobs/lease.py); if another nightly holds it, says which and exits 0.
2. Compares the source's files with the ones the current champion was trained on (its
   pipeline run's ingest index); nothing new: trains nothing, says so, exits 0.
3. Runs the DAG (finished stages are reused), warm-started from the champion with
   `nightly.warm_start`; the register stage registers the challenger.
4. Scores challenger and champion on the frozen benchmark (frozen from the first nightly's
   test split, refused if its files changed) with the evaluate stage's code.
5. The gate (jobs/gate.py) moves the champion alias only if the challenger is better; the
   decision and both models' figures go to a `gate` run, the version's tags and stdout.

Exit codes: 0 done (promoted, kept, nothing new, another nightly running), 1 a stage failed,
2 a mistake in the config or command line, or a changed benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from jobs.gate import Decision, decide
from jobs.lease import Lease, LeaseHeld
from jobs.promote import aliased_version, client_for, move_alias
from pipelines import env
from pipelines.config import PipelineConfig, load_config
from pipelines.errors import UserError
from pipelines.storage import Storage


@dataclass
class NightlyOutcome:
    state: str  # busy | no_new_data | promoted | kept | failed
    message: str
    version: int | None = None  # the challenger registered tonight
    champion: int | None = None  # the champion after tonight
    run_id: str | None = None  # the pipeline's MLflow run
    decision: Decision | None = None


class NightlyError(UserError):
    """The config cannot run a nightly; one line."""


def run_nightly(config: str, overrides=(), echo=print, date: str | None = None) -> NightlyOutcome:
    cfg = load_config(config, list(overrides))
    if not cfg.registry.enabled:
        raise NightlyError(f"{config}: the nightly promotes registered models: set registry.enabled: true")
    date = date or time.strftime("%Y-%m-%d", time.gmtime())
    lease = Lease(Storage(cfg.storage.root).child("locks"), f"nightly-{cfg.nightly.model}", cfg.nightly.lease_seconds)
    what = f"nightly {date} of {cfg.name}"
    try:
        with lease.hold(what) as holder:
            if lease.recovered is not None:
                echo(f"nightly: took over the lock of {lease.recovered.describe()}, which is gone")
            echo(f"nightly: lock held by {holder.describe()}")
            return Night(cfg, list(overrides), config, date, echo).run()
    except LeaseHeld as held:
        message = f"another nightly is running: {held.holder.describe()}; this one does nothing"
        echo(f"nightly: {message}")
        return NightlyOutcome("busy", message)


class Night:
    def __init__(self, cfg: PipelineConfig, overrides: list[str], config: str, date: str, echo):
        from pipelines.lineage import tracking_uri

        self.cfg, self.overrides, self.config, self.date, self.echo = cfg, overrides, config, date, echo
        self.model, self.alias = cfg.nightly.model, cfg.nightly.champion_alias
        self.uri = tracking_uri(cfg.mlflow)
        self.client = client_for(self.uri)

    def run(self) -> NightlyOutcome:
        from jobs import night_record
        from pipelines.runner import run_pipeline, stage_summary

        champion = aliased_version(self.client, self.model, self.alias)
        new, known = night_record.new_source_files(self.cfg, self.client, champion)
        if champion is not None and known is not None and not new:
            message = (
                f"nothing new since {self.model} version {champion.version} ({self.alias}) was trained on "
                f"{len(known)} source files: nothing trained"
            )
            self.echo(f"nightly: {message}")
            run_id = night_record.quiet_night(self.cfg, self.date, message)
            return NightlyOutcome("no_new_data", message, champion=int(champion.version), run_id=run_id)
        self.echo(f"nightly: {self.why_train(champion, new, known)}")
        cfg = self.warm_started(champion)
        outcome = run_pipeline(
            cfg,
            run_name=f"nightly {self.date}",
            tags={"crossmodal.nightly": self.date, "crossmodal.new_files": str(len(new))},
        )
        if outcome.failure is not None:
            message = f"stage '{outcome.failure.name}' failed: {outcome.failure.error}"
            self.echo(f"nightly: {message}")
            return NightlyOutcome("failed", message, run_id=outcome.run_id)
        stages = outcome.by_name()
        version = int(stage_summary(stages["register"].output_uri)["version"])
        figures, decision = self.gate(cfg, stages, version, champion, outcome.run_id)
        report = night_record.record_gate(
            self.client, cfg, outcome.run_id, self.model, version, champion, figures, decision
        )
        self.echo(report)
        champion_now = version if decision.promote else (int(champion.version) if champion else None)
        state = "promoted" if decision.promote else "kept"
        return NightlyOutcome(state, decision.reason, version, champion_now, outcome.run_id, decision)

    def why_train(self, champion, new: list[dict], known: list[dict] | None) -> str:
        if champion is None:
            return f"no {self.model}@{self.alias} yet: training the first one"
        if known is None:
            return f"the data {self.model} version {champion.version} was trained on is not recorded: training"
        return f"{len(new)} new or changed source files since version {champion.version} was trained: training"

    def warm_started(self, champion) -> PipelineConfig:
        if not self.cfg.nightly.warm_start or champion is None:
            return self.cfg
        start = f"models:/{self.model}/{champion.version}"
        self.echo(f"nightly: warm start: train starts from {start}")
        return load_config(self.config, [*self.overrides, f"train.init_from={start}"])

    def gate(self, cfg: PipelineConfig, stages: dict, version: int, champion, run_id: str):
        """Both models' figures on the frozen benchmark, and the decision."""
        from pipelines.config.compress import Scored
        from pipelines.data.spec import DatasetSpec
        from pipelines.evaluation.benchmark import BENCHMARK_SPLIT, freeze, open_frozen, score_models
        from pipelines.inference.resolve import model_folder
        from pipelines.runner import connect_ray

        folder = Storage(cfg.nightly.benchmark.folder or Storage(cfg.storage.root).child("benchmark", self.model).uri)
        bench = open_frozen(folder)
        if bench is None:
            bench = freeze(stages["shard"].output_uri, cfg.nightly.benchmark.split, folder, f"pipeline run {run_id}")
            self.echo(
                f"nightly: froze the benchmark: {bench.samples} samples of {bench.manifest['split']} in {folder.uri}"
            )
        else:
            self.echo(
                f"nightly: benchmark {folder.uri}: {bench.samples} samples, unchanged ({bench.content_hash[:12]})"
            )
        connect_ray(cfg.ray, env.configure())
        spec = DatasetSpec(**Storage(stages["prepare"].output_uri).read_json("dataset_spec.json"))
        section = Scored(split=BENCHMARK_SPLIT, max_samples=cfg.nightly.benchmark.max_samples)
        folders = {"challenger": model_folder(f"models:/{self.model}/{version}", self.uri)}
        if champion is not None and int(champion.version) != version:
            folders["champion"] = model_folder(f"models:/{self.model}/{champion.version}", self.uri)
        figures = score_models(folders, bench, spec, section)
        figures["benchmark"] = {"samples": bench.samples, "content_hash": bench.content_hash}
        if champion is not None and int(champion.version) == version:
            return figures, Decision(False, f"kept: version {version} is the {self.alias} already")
        decision = decide(figures["challenger"], figures.get("champion"), cfg.nightly.gate)
        if decision.promote:
            move_alias(self.client, self.model, self.alias, version, "promote", decision.reason, by="nightly gate")
        return figures, decision


def main(argv: list[str] | None = None) -> int:
    env.configure()
    parser = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config with registry.enabled: true (e.g. pipelines/configs/nightly.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--date", help="the night's date in run names (default: today, UTC)")


def command(args) -> int:
    try:
        outcome = run_nightly(args.config, args.overrides, date=args.date)
    except UserError as err:
        print(f"crossmodal nightly: error: {err}", file=sys.stderr)
        return 2
    return 1 if outcome.state == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
