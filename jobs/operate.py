"""`crossmodal nightly | promote | rollback`: the nightly retrain and moving the champion by hand."""

from __future__ import annotations

from jobs import nightly

ALIAS = "champion"


def add_commands(sub) -> None:
    night = sub.add_parser("nightly", help="retrain on new data and promote the model only if it is better")
    nightly.add_arguments(night)

    promote = sub.add_parser("promote", help="point the champion alias at a registered version, by hand")
    promote.add_argument("version", type=int)
    promote.add_argument("--why", required=True, help="recorded on the version with your name")
    rollback = sub.add_parser("rollback", help="point the champion alias back at the one before it")
    rollback.add_argument("--why", required=True, help="recorded on the version with your name")
    for parser in (promote, rollback):
        parser.add_argument("--config", help="read the MLflow location and model name from this config")
        parser.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, ./runs)"
        )
        parser.add_argument(
            "--model", help="registered model name (default: the config's registry.name, else crossmodal)"
        )
        parser.add_argument("--alias", default=ALIAS, help=f"the alias to move (default: {ALIAS})")
        parser.add_argument("--by", help="who moves it (default: your user name)")


def command_promote(args) -> int:
    from jobs.promote import move_alias

    client, model = registry_of(args)
    move = move_alias(client, model, args.alias, args.version, "promote", args.why, args.by)
    print(f"{model}@{args.alias}: version {move.previous or '-'} -> {move.version} (by {move.by}: {args.why})")
    return 0


def command_rollback(args) -> int:
    from jobs.promote import rollback

    client, model = registry_of(args)
    move = rollback(client, model, args.alias, args.why, args.by)
    print(f"{model}@{args.alias}: rolled back version {move.previous} -> {move.version} (by {move.by}: {args.why})")
    return 0


def registry_of(args):
    from jobs.promote import client_for
    from pipelines.config import MlflowConfig, load_config
    from pipelines.lineage import tracking_uri

    cfg = load_config(args.config) if args.config else None
    uri = args.tracking_uri or tracking_uri(cfg.mlflow if cfg else MlflowConfig())
    model = args.model or (cfg.registry.name if cfg else "crossmodal")
    return client_for(uri), model


COMMANDS = {"nightly": nightly.command, "promote": command_promote, "rollback": command_rollback}
