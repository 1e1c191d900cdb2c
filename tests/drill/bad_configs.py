"""Bad configs, command lines, source folders and requests, as a user makes them: each must be
one line on stderr naming the key, argument, path or field, the right exit code (2 a mistake
in the config or command line, 1 a stage that failed on its input), never a traceback.

The command is the real `crossmodal` (`jobs.cli.main`): most cases in-process (cheap), a few
as a subprocess to prove what a shell sees (exit status, every line of stderr). The serving
cases call the registered model's pyfunc (`pipelines.compression.pyfunc`) in-process: its
BadRow is what `mlflow models serve` turns into an HTTP status and a JSON body
(tests/pipelines/compression/test_serve.py runs the server itself)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from tests.drill.case import Drill, Row

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"
NOBODY = 65534  # the unprivileged user an unreadable folder is tried as, when the drill runs as root
SPLIT_SAMPLES = 16  # with the demo's fractions {train 0.92, val 0.03, test 0.05}: no test sample


@dataclass
class Said:
    """What the command did: its exit code and what it wrote."""

    code: int | str
    stderr: str
    stdout: str = ""

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def in_process(argv: list[str]) -> Said:
    from jobs import cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception:  # noqa: BLE001 - what a user would see as a traceback
        err.write(traceback.format_exc())
        code = "raised"
    return Said(code, err.getvalue(), out.getvalue())


def as_shell(argv: list[str], cwd: Path, user: int | None = None, timeout: float = 120) -> Said:
    """`crossmodal ARGV` in a subprocess from `cwd`; as uid `user` when given (needs root and
    setpriv: Popen(user=) cannot exec this venv's python, a link into root's own folder)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(cwd))
    command = [sys.executable, "-m", "jobs.cli", *argv]
    done = subprocess.run(as_user(user, command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Said(done.returncode, done.stderr, done.stdout)


def as_user(user: int | None, command: list[str]) -> list[str]:
    if user is None:
        return command
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]


def runs_as(user: int) -> bool:
    """Whether `user` can import the project with this Python (not when the checkout or the venv
    lies in a folder only root may enter)."""
    probe = [sys.executable, "-c", "import jobs.cli, pydantic"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(as_user(user, probe), env=env, cwd="/", capture_output=True).returncode == 0


def refused(user: int | None, folder: Path) -> bool:
    """Whether listing `folder` really fails for `user` (as root, chmod alone stops nothing)."""
    probe = [sys.executable, "-S", "-c", f"import os; os.listdir({str(folder)!r})"]
    return subprocess.run(as_user(user, probe), capture_output=True).returncode != 0


def row(case: str, done: str, names: str, said: Said, code: int, how: str = "") -> Row:
    """Passes iff stderr is exactly one line, names `names`, holds no traceback, exit `code`."""
    lines = said.lines
    shown = " / ".join(lines[:3]).replace("|", "\\|")
    if len(shown) > 200:
        shown = shown[:197] + "..."
    passed = len(lines) == 1 and names in lines[0] and "Traceback" not in said.stderr and said.code == code
    outcome = f"exit {said.code}, {len(lines)} line(s){how}: {shown}"
    return Row(case, done, f"one line naming `{names}`, exit {code}", outcome, passed)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return str(path)


# -- the config file and the command line: no Ray, in a few seconds ----------------------------
def config_cases(scratch: Path) -> list[Row]:
    where = [f"--set=storage.root={scratch / 'storage'}", f"--set=mlflow.local_store={scratch / 'runs'}"]
    demo = str(DEMO)
    unknown = write(scratch, "unknown.yaml", "name: x\ningest:\n  source: demo\n  bogus: 1\n")
    syntax = write(scratch, "syntax.yaml", "name: x\ningest:\n  source: [demo\n")
    wrong_type = write(scratch, "type.yaml", "name: x\ntrain:\n  max_steps: lots\n")
    out_of_range = write(scratch, "range.yaml", "name: x\nshard:\n  samples_per_shard: -4\n")
    top_list = write(scratch, "list.yaml", "- a\n- b\n")
    rows = [
        row(
            "cfg-unknown-key",
            "config with ingest.bogus: 1",
            "ingest.bogus",
            as_shell(["run", unknown], scratch),
            2,
            " (shell)",
        ),
        row(
            "cfg-yaml-syntax",
            "unclosed [ on line 3 of the config",
            "syntax.yaml:4",
            as_shell(["run", syntax], scratch),
            2,
            " (shell)",
        ),
        row("cfg-wrong-type", "train.max_steps: lots", "train.max_steps", in_process(["run", wrong_type]), 2),
        row(
            "cfg-out-of-range",
            "shard.samples_per_shard: -4",
            "shard.samples_per_shard",
            in_process(["run", out_of_range]),
            2,
        ),
        row("cfg-not-a-mapping", "a YAML list as the config", "list.yaml", in_process(["run", top_list]), 2),
        row("cfg-missing-file", "run nofile.yaml", "nofile.yaml", in_process(["run", str(scratch / "nofile.yaml")]), 2),
        row("cfg-set-no-equals", "--set foo", "--set foo", in_process(["run", demo, "--set", "foo"]), 2),
        row(
            "cfg-set-unknown-key",
            "--set train.nokey=3",
            "train.nokey",
            in_process(["run", demo, "--set", "train.nokey=3"]),
            2,
        ),
        row(
            "cfg-splits-sum",
            "--set shard.splits={train: 0.5}",
            "shard.splits",
            in_process(["run", demo, "--set", "shard.splits={train: 0.5}"]),
            2,
        ),
        row(
            "cli-unknown-command",
            "crossmodal frobnicate",
            "frobnicate",
            as_shell(["frobnicate"], scratch),
            2,
            " (shell)",
        ),
        row("cli-missing-argument", "crossmodal run (no config)", "config", in_process(["run"]), 2),
        row("cli-bad-int", "crossmodal status -n many", "-n", in_process(["status", "-n", "many"]), 2),
        row(
            "cli-unknown-stage",
            "run --only nostage",
            "nostage",
            in_process(["run", demo, *where, "--only", "nostage"]),
            2,
        ),
        row(
            "cfg-evaluate-model-folder",
            "evaluate.model=<missing folder>",
            "evaluate.model",
            as_shell(["run", demo, *where, f"--set=evaluate.model={scratch / 'no-model'}"], scratch),
            2,
            " (shell)",
        ),
        row(
            "cfg-evaluate-model-uri",
            "evaluate.model=models:/nosuch@champion",
            "evaluate.model",
            in_process(["run", demo, *where, "--set=evaluate.model=models:/nosuch@champion"]),
            2,
        ),
        row(
            "cfg-init-from-missing",
            "train.init_from=<missing folder>",
            "train.init_from",
            in_process(["run", demo, *where, f"--set=train.init_from={scratch / 'no-model'}"]),
            2,
        ),
        row(
            "cli-jobs-status-no-cluster",
            "jobs status NO-SUCH-ID (no cluster: RAY_ADDRESS unset)",
            "--address",
            in_process_without("RAY_ADDRESS", ["jobs", "status", "NO-SUCH-ID"]),
            2,
        ),
        row(
            "cli-jobs-unreachable",
            "jobs status NO-SUCH-ID --address <a port nothing listens on>",
            "cannot reach a Ray dashboard",
            in_process(["jobs", "status", "NO-SUCH-ID", "--address", f"http://127.0.0.1:{free_port()}"]),
            2,
        ),
        row(
            "app-missing-model",
            "caption <missing model folder> x.png",
            "no-model",
            in_process(["caption", str(scratch / "no-model"), str(scratch / "x.png")]),
            2,
        ),
    ]
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process_without(variable: str, argv: list[str]) -> Said:
    saved = os.environ.pop(variable, None)
    try:
        return in_process(argv)
    finally:
        if saved is not None:
            os.environ[variable] = saved


# -- source folders: survey (`crossmodal init`) without Ray ------------------------------------
def folder_cases(scratch: Path) -> list[Row]:
    empty = scratch / "empty"
    empty.mkdir()
    rows = [
        row(
            "src-empty-folder-init",
            "init <empty folder>",
            "has no files",
            in_process(["init", str(empty), "-o", str(scratch / "e.yaml")]),
            2,
        ),
        row(
            "src-missing-folder-init",
            "init <no such folder>",
            "no-data",
            in_process(["init", str(scratch / "no-data"), "-o", str(scratch / "m.yaml")]),
            2,
        ),
    ]
    # An unreadable folder: as root chmod stops nothing, so the command runs as an unprivileged
    # user, from a folder of its own outside the (private) scratch; without root, as ourselves.
    # Where that user cannot run the project (a checkout in a private folder, as a CI clone under
    # mktemp -d), the folder is a link to itself, which nobody can list. That the listing is
    # really refused, and only the locked folder's, is checked, not assumed.
    user = NOBODY if os.geteuid() == 0 and shutil.which("setpriv") and runs_as(NOBODY) else None
    as_root = os.geteuid() == 0 and user is None
    home = Path(tempfile.mkdtemp(prefix="drill-unreadable-"))
    locked = home / "locked"
    if as_root:
        locked.symlink_to(locked)
    else:
        locked.mkdir()
        (locked / "a.txt").write_text("a caption")
        locked.chmod(0)
    try:
        if user is not None:
            home.chmod(0o777)
        blocked = refused(user, locked) and not refused(user, home)
        said = as_shell(["init", str(locked), "-o", str(home / "u.yaml")], home, user=user)
    finally:
        if not as_root:
            locked.chmod(0o755)
        shutil.rmtree(home, ignore_errors=True)
    done = "init <a folder that links to itself>" if as_root else "init <folder chmod 000>"
    how = f" (shell as uid {user if user is not None else os.geteuid()}, listing refused: {blocked})"
    found = row("src-unreadable-folder-init", done, "cannot read", said, 2, how)
    found.passed = found.passed and blocked  # a folder that could be read proves nothing
    rows.append(found)
    return rows


# -- requests to the served model: the pyfunc's checks, the HTTP status MLflow gives them ------
def request_cases(scratch: Path) -> list[Row]:
    from pipelines.apps.api import CrossModal
    from pipelines.compression.folder import load_any
    from pipelines.compression.pyfunc import MAX_FILE_BYTES, BadRow, CrossModalPyfunc, example_files
    from tests.pipelines.compression.test_pyfunc import tiny_model

    folder = tiny_model(scratch / "model")
    served = CrossModalPyfunc()
    served.app = CrossModal(load_any(folder), folder)
    png = base64.b64encode(example_files()[0]).decode("ascii")
    huge = "A" * (MAX_FILE_BYTES * 4 // 3 + 8)
    cases = [
        ("req-no-field", "a row with no text, image or audio", [{"task": "embed"}], None, "row 0: embed"),
        ("req-wrong-type", "text: 5 (a number)", [{"text": 5}], None, "row 0: text"),
        ("req-too-large", f"image: {len(huge) >> 20} MiB of base64", [{"image": huge}], None, "row 0: image"),
        ("req-bad-base64", "image: 'not base64!'", [{"image": "not base64!"}], None, "row 0: image"),
        ("req-unknown-task", "task: dance", [{"task": "dance", "text": "x"}], None, "row 0: task"),
        (
            "req-answer-no-question",
            "task answer, image only",
            [{"task": "answer", "image": png}],
            None,
            "row 0: answer",
        ),
        ("req-bad-param", "params beam_size=99", [{"task": "caption", "image": png}], {"beam_size": 99}, "beam_size"),
    ]
    rows = []
    for case, done, request, params, names in cases:
        try:
            served.predict(None, request, params)
            status, body = 200, "(answered)"
        except BadRow as err:
            status, body = err.get_http_status_code(), err.serialize_as_json()
        except Exception as err:  # noqa: BLE001 - a 500, its traceback in the server log
            status, body = 500, f"{type(err).__name__}: {err}"
        passed = 400 <= status < 500 and names in body and "\n" not in body and "Traceback" not in body
        shown = body if len(body) < 200 else body[:197] + "..."
        rows.append(Row(case, done, f"HTTP 4xx, one-line JSON naming `{names}`", f"HTTP {status}: {shown}", passed))
    return rows


def app_cases(scratch: Path) -> list[Row]:
    """The application commands on a real (tiny, random) model folder: bad files and questions."""
    from pipelines.compression.pyfunc import example_files

    folder, image = str(scratch / "model"), scratch / "square.png"
    image.write_bytes(example_files()[0])
    text = scratch / "notes.txt"
    text.write_text("not an image")
    return [
        row(
            "app-missing-file",
            "caption MODEL missing.png",
            "missing.png",
            in_process(["caption", folder, str(scratch / "missing.png")]),
            2,
        ),
        row("app-not-media", "caption MODEL notes.txt", "notes.txt", in_process(["caption", folder, str(text)]), 2),
        row(
            "app-empty-question",
            "answer MODEL square.png ''",
            "question",
            in_process(["answer", folder, str(image), " "]),
            2,
        ),
        row(
            "app-missing-index",
            "search MODEL <no index> --text x",
            "no-index",
            in_process(["search", folder, str(scratch / "no-index"), "--text", "a red square"]),
            2,
        ),
    ]


def quick_cases(scratch: Path) -> list[Row]:
    # request_cases writes the tiny model folder app_cases uses
    return config_cases(scratch) + folder_cases(scratch) + request_cases(scratch) + app_cases(scratch)


# -- with Ray: what only the ingest, shard and prepare stages can find -------------------------
def stage_cases(scratch: Path) -> list[Row]:
    where = [f"--set=storage.root={scratch / 'storage'}", f"--set=mlflow.local_store={scratch / 'runs'}"]
    empty = scratch / "empty"
    empty.mkdir()
    folder = ["--set=ingest.source=folder", "--only", "ingest"]
    rows = [
        row(
            "src-missing-path-run",
            "run with ingest.path=<no such folder>",
            "ingest.path",
            in_process(["run", str(DEMO), *where, *folder, f"--set=ingest.path={scratch / 'no-data'}"]),
            1,
        ),
        row(
            "src-empty-folder-run",
            "run with ingest.path=<empty folder>",
            "has no files",
            in_process(["run", str(DEMO), *where, *folder, f"--set=ingest.path={empty}"]),
            1,
        ),
    ]
    return rows + [split_case(scratch, where)]


def split_case(scratch: Path, where: list[str]) -> Row:
    """The issue's fault: a few samples with the demo's split fractions left a split empty and
    prepare crashed with a bare IndexError. Now prepare runs without that split and says so."""
    from pipelines.runner import stage_summary

    argv = [
        "run",
        str(DEMO),
        *where,
        f"--set=ingest.demo.num_samples={SPLIT_SAMPLES}",
        "--only",
        "ingest,shard,prepare",
        "--set=prepare.image_size=32",
        "--set=prepare.preview_samples=2",
    ]
    said = in_process(argv)
    ran = [line for line in said.stdout.splitlines() if line.startswith("[prepare] ran in")]
    warnings = stage_summary(ran[0].rsplit("-> ", 1)[1])["warnings"] if ran else []
    named = [w for w in warnings if "shard.splits" in w and "split has no" in w]
    passed = said.code == 0 and len(named) == 1 and "Traceback" not in said.stderr
    outcome = f"exit {said.code}; " + (named[0] if named else f"no warning naming the split; stderr: {said.lines[-1:]}")
    return Row(
        "cfg-split-too-small",
        f"demo fractions on {SPLIT_SAMPLES} samples (ingest, shard, prepare)",
        "prepare runs without the empty split; one line names it and shard.splits",
        outcome.replace("|", "\\|"),
        passed,
    )


DRILLS = [
    Drill("bad_config_lines", "bad config", quick_cases),
    Drill("bad_config_stages", "bad config", stage_cases, needs_ray=True),
]
