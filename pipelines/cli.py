"""The `crossmodal` command: run a pipeline, show its DAG and recent runs, and the applications
on a trained model (index, search, caption, answer).

Exit codes: 0 done, 1 a stage failed, 2 a mistake in the config or the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines import env
from pipelines.apps import cli as apps_cli
from pipelines.errors import UserError
from pipelines.redact import redact

USAGE_ERROR, STAGE_FAILED = 2, 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (argparse prints the whole usage
    first); subcommands' parsers are of this class too (add_subparsers takes the parent's)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(extensions=()) -> argparse.ArgumentParser:
    """The pipeline's commands, the apps' and each extension module's (`add_commands(sub)`)."""
    parser = OneLineParser(prog="crossmodal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline a config describes (reusing finished stages)")
    run.add_argument("config", help="YAML config, e.g. pipelines/configs/demo.yaml")
    run.add_argument("--only", help="comma-separated stages to run; the rest must have finished before")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run STAGE and every stage after it")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if they finished")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set shard.samples_per_shard=64 (repeatable)",
    )
    run.add_argument(
        "--materialize",
        action="store_true",
        help="prepare writes decoded samples to Parquet for reuse (same as --set prepare.materialize=true)",
    )

    stages = sub.add_parser("stages", help="print the DAG: order, dependencies, identity and reuse state")
    stages.add_argument("config")
    stages.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    init = sub.add_parser("init", help="write a config that fits your data (a folder, a JSONL manifest or shards)")
    init.add_argument("data", help="a folder of files grouped by key, a JSONL manifest, or WebDataset shards")
    init.add_argument("-o", "--output", help="the config file to write (default: <name>.yaml)")
    init.add_argument("--name", help="the pipeline's name (default: the data folder's name)")
    init.add_argument("--samples", type=int, default=2000, help="samples to read for the survey (default: 2000)")
    init.add_argument("--force", action="store_true", help="overwrite the output file")

    status = sub.add_parser("status", help="recent pipeline runs and their stages, from MLflow")
    status.add_argument("--config", help="read the MLflow location from this config")
    status.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, ./runs)")
    status.add_argument("-n", "--limit", type=int, default=10)
    apps_cli.add_commands(sub)
    for extension in extensions:
        extension.add_commands(sub)
    return parser


def main(argv: list[str] | None = None, extensions=()) -> int:
    """`extensions`: modules with `add_commands(sub)` and `COMMANDS` (name -> handler(args) -> exit
    code), e.g. the jobs package's submit, nightly and promote (see jobs/cli.py)."""
    env.configure()
    # A new store's "Creating initial MLflow database tables" is not news, and it would make a
    # one-line error two lines.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    args = build_parser(extensions).parse_args(argv)
    try:
        if args.command in apps_cli.COMMANDS:
            return apps_cli.run(args)
        commands = {"run": command_run, "stages": command_stages, "status": command_status, "init": command_init}
        for extension in extensions:
            commands |= extension.COMMANDS
        return commands[args.command](args)
    except UserError as err:  # config, plan, input, model reference, survey: one line, exit 2
        print(f"{own_line()}crossmodal: error: {err}", file=sys.stderr)
        return USAGE_ERROR


def own_line() -> str:
    """What to print before an error so it starts a line of its own: on a terminal a progress
    bar may hold the cursor mid-line; in a log (progress as lines) every line is already ended."""
    return "\n" if env.progress_mode() == "bars" else ""


def command_run(args) -> int:
    from pipelines.config import load_config

    cfg = load_config(args.config, args.overrides + (["prepare.materialize=true"] if args.materialize else []))
    from pipelines.runner import run_pipeline  # Ray, MLflow, every stage: only once the config is valid

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    outcome = run_pipeline(cfg, only=only, from_stage=args.from_stage, force=args.force)
    summary = ", ".join(
        f"{s.name} {s.state}" + (f" ({s.seconds:.1f} s)" if s.state == "ran" else "") for s in outcome.stages
    )
    print(f"\n{outcome.status}: {summary}")
    print(redact(f"results under {outcome.storage_uri}"))
    print(redact(f"MLflow run {outcome.run_id} in {outcome.tracking_uri}"))
    store = redact(outcome.tracking_uri)
    print(f"open the MLflow UI: make ui   (or: mlflow ui --backend-store-uri {store} --host 127.0.0.1)")
    registered = outcome.by_name().get("register")
    if registered is not None and registered.state in ("ran", "reused"):
        from pipelines.runner import stage_summary

        summary = stage_summary(registered.output_uri)
        print(f"registered model: {summary['model']} (version {summary['version']}, the {summary['final']} model)")
        print(f"serve it: {summary['serve']}")
    failure = outcome.failure
    if failure is not None:
        print(f"{own_line()}crossmodal: stage '{failure.name}' failed: {failure.error}", file=sys.stderr)
        return STAGE_FAILED
    return 0


def command_stages(args) -> int:
    from pipelines.config import load_config
    from pipelines.runner import plan_state

    cfg = load_config(args.config, args.overrides)
    print(f"{'stage':10}  {'needs':16}  {'identity':12}  state")
    for stage, ident, prior in plan_state(cfg):
        state = f"finished (run {prior[0]}) -> {prior[1]}" if prior else "to run"
        print(f"{stage.name:10}  {','.join(stage.needs) or '-':16}  {ident[:12]:12}  {state}")
    return 0


def command_init(args) -> int:
    from pathlib import Path

    from pipelines.config import ConfigError, load_config
    from pipelines.scaffold import config_name, render
    from pipelines.survey import survey

    found = survey(args.data, args.samples)
    name = args.name or config_name(args.data)
    output = Path(args.output or f"{name}.yaml")
    if output.exists() and not args.force:
        raise ConfigError(f"{output}: exists (pass --force to overwrite it, or -o another file)")
    output.write_text(render(found, name), encoding="utf-8")
    cfg = load_config(output)  # what was written must load: a mistake here is ours, said as the user's would be
    shown = ", ".join(f"{c} {n}" for c, n in found.combinations.most_common())
    print(f"read {found.samples} of {found.total} samples in {args.data} ({shown})")
    if found.rejected:
        print(f"rejected while reading: {dict(found.rejected)} (the ingest stage quarantines them with their reason)")
    print(
        f"wrote {output}: images {cfg.prepare.image_size} px, audio {cfg.prepare.sample_rate} Hz cropped at "
        f"{cfg.prepare.max_audio_seconds:g} s, splits {cfg.shard.splits}"
    )
    print(f"next: crossmodal run {output}")
    return 0


def command_status(args) -> int:
    from pipelines.config import MlflowConfig, load_config
    from pipelines.lineage import tracking_uri
    from pipelines.status import format_status, recent_pipelines

    if args.tracking_uri:
        uri = args.tracking_uri
    else:
        uri = tracking_uri(load_config(args.config).mlflow if args.config else MlflowConfig())
    print(format_status(recent_pipelines(uri, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
