"""`crossmodal index | search | caption | answer`: the applications on the command line.

MODEL is a model folder, `runs:/<run_id>/model`, a run id, or `models:/<name>@<alias>`.
Generated text is shown after the content filter; a blocked text is replaced and the reason
goes to stderr. `--json` prints one JSON object instead of the human-readable lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def add_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="pipeline config to read the MLflow location and the content filter (evaluate.safety) from"
    )
    common.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI for runs:/ and models:/ (default: config, $MLFLOW_TRACKING_URI, ./runs)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    index = sub.add_parser("index", parents=[common], help="embed a corpus of shards into an on-disk index")
    index.add_argument("model")
    index.add_argument("shards", nargs="+", help="shard files, folders of shards or glob patterns")
    index.add_argument("-o", "--output", default="index", help="index folder to write (default: ./index)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--actors", type=int, default=1, help="model replicas embedding in parallel")

    search = sub.add_parser("search", parents=[common], help="top-k results of a query in the index's other modalities")
    search.add_argument("model")
    search.add_argument("index")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", metavar="FILE")
    query.add_argument("--audio", metavar="FILE")
    search.add_argument("-k", type=int, default=10)

    caption = sub.add_parser("caption", parents=[common], help="caption an image or audio file")
    caption.add_argument("model")
    caption.add_argument("file")
    caption.add_argument("--beam-size", type=int, default=3)

    answer = sub.add_parser("answer", parents=[common], help="answer a question about an image")
    answer.add_argument("model")
    answer.add_argument("image")
    answer.add_argument("question")


COMMANDS = ("index", "search", "caption", "answer")


def run(args) -> int:
    import logging

    # MLflow's INFO lines (creating a store, downloading) would bury the one line of output.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return {"index": command_index, "search": command_search, "caption": command_caption, "answer": command_answer}[
        args.command
    ](args)


def settings(args):
    """(tracking URI or None, safety config, config) from --tracking-uri / --config / the environment."""
    from pipelines.config import MlflowConfig, load_config
    from pipelines.inference.pin import is_registered, is_run
    from pipelines.lineage import tracking_uri

    cfg = load_config(args.config) if args.config else None
    uri = args.tracking_uri
    # Only an MLflow reference needs a tracking store: finding the default one creates ./runs,
    # which a model folder must not leave in the user's working directory.
    if uri is None and (is_registered(args.model) or is_run(args.model)):
        uri = tracking_uri(cfg.mlflow if cfg else MlflowConfig())
    return uri, (cfg.evaluate.safety if cfg else None), cfg


def load_app(args):
    from pipelines.apps.api import CrossModal

    uri, safety, cfg = settings(args)
    return CrossModal.load(args.model, uri, safety), cfg


def command_index(args) -> int:
    from pipelines.apps.index import build_index
    from pipelines.config import RayConfig
    from pipelines.env import configure
    from pipelines.runner import connect_ray

    app, cfg = load_app(args)
    connect_ray(cfg.ray if cfg else RayConfig(), configure())
    meta = build_index(app, args.shards, args.output, args.batch_size, args.actors)
    if args.json:
        print(json.dumps(meta))
    else:
        counts = ", ".join(f"{n} {m}" for m, n in meta["modalities"].items())
        skipped = sum(meta["quarantined"].values())
        print(
            f"indexed {meta['samples']} samples ({counts}) from {meta['shards']} shards in {meta['seconds']} s"
            + (f"; {skipped} quarantined: {meta['quarantined']}" if skipped else "")
            + f" -> {args.output}"
        )
    return 0


def command_search(args) -> int:
    from pipelines.apps.index import load_index, search

    app, _ = load_app(args)
    index = load_index(args.index)
    if args.text is not None:
        modality, query = "text", app.embed_text([args.text])[0]
    else:
        modality, query = app.embed_file(args.image or args.audio)
        expected = "image" if args.image else "audio"
        if modality != expected:
            from pipelines.apps.api import InputError

            raise InputError(f"{args.image or args.audio}: an {modality} file given to --{expected}")
    results = search(app, index, modality, query, args.k)
    if args.json:
        print(json.dumps({m: [asdict(h) for h in hits] for m, hits in results.items()}))
        return 0
    for target, hits in results.items():
        print(f"{target} ({len(index.rows(target))} in the index):")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:2d}. {hit.score:+.3f}  {hit.key}  {hit.text}")
    return 0


def command_caption(args) -> int:
    result = load_app(args)[0].caption(args.file, beam_size=args.beam_size)
    return show(result, args)


def command_answer(args) -> int:
    result = load_app(args)[0].answer(args.image, args.question)
    return show(result, args)


def show(result, args) -> int:
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    print(result.text + (f"  (p={result.score:.2f})" if result.score is not None else ""))
    if result.blocked:
        print(f"crossmodal: the content filter withheld the output ({result.reason})", file=sys.stderr)
    return 0
