"""`mlflow models serve` on the registered model (models:/crossmodal@challenger, from this
environment: --env-manager local): POST /invocations answers embeddings for text, base64 images
and base64 WAV; a malformed request is a 4xx whose JSON body carries a one-line reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from model.config import model_config
from pipelines.compression.pyfunc import example_files
from tests.conftest import free_port
from tests.pipelines.compression.test_pyfunc import MODEL, b64, registered

# The server imports torch and MLflow and loads the model: about 10 s to the first /ping on 2 cores.
pytestmark = [
    pytest.mark.spawn,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Operation with range is deprecated"),  # MLflow on pandas 3
]
READY_WITHIN = 180.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = registered(root)
    port, bin_dir = free_port(), Path(sys.executable).parent
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=store["uri"],
        MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the server execs this venv's uvicorn
        HOME=str(root),
    )
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", MODEL, "--env-manager", "local"]
    log = root / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe nobody reads: the server logs every request
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,  # its own process group: stopped whole, uvicorn included
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/ping", log)
        yield {"url": url, "store": store, "log": log}
    finally:
        stop_group(process)


def wait_ready(process, ping: str, log: Path) -> None:
    """Poll /ping until it answers 200, the server exits, or the deadline passes."""
    deadline = time.monotonic() + READY_WITHIN
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(ping, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet (URLError, connection refused, reset)
            pass
        try:  # the pause between polls doubles as the check that the server is still alive
            process.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"mlflow models serve exited with {process.returncode}:\n{tail(log)}")
    raise AssertionError(f"mlflow models serve not ready within {READY_WITHIN} s:\n{tail(log)}")


def stop_group(process) -> None:
    """SIGTERM to the whole group (mlflow and its uvicorn), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()
    deadline = time.monotonic() + 20
    while group_alive(process.pid) and time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)  # a kill is asynchronous: nothing to wait on for a process not our child
    assert not group_alive(process.pid), "server processes left running"


def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of the group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def post(url: str, body, content_type: str = "application/json") -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_invocations_embed_text_image_and_audio(server):
    png, wav = example_files()
    records = [
        {"text": "a red square"},
        {"image": b64(png)},
        {"task": "embed", "audio": b64(wav), "text": "a tone"},
        {"task": "caption", "image": b64(png)},
        {"task": "answer", "image": b64(png), "question": "what shape is it?"},
    ]
    status, body = post(server["url"], {"dataframe_records": records, "params": {"beam_size": 1, "max_len": 6}})
    assert status == 200, body
    rows = json.loads(body)["predictions"]
    size = model_config("tiny").embed_dim
    assert [len(rows[0]["text_embedding"]), len(rows[1]["image_embedding"]), len(rows[2]["audio_embedding"])] == [
        size
    ] * 3
    assert len(rows[2]["text_embedding"]) == size and rows[0]["image_embedding"] is None
    assert isinstance(rows[3]["caption"], str) and rows[3]["blocked"] is False
    assert isinstance(rows[4]["answer"], str) and 0 < rows[4]["score"] <= 1


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([{"text": "fine"}, {"image": "not base64!"}], "row 1: image: not valid base64"),
        ([{"image": b64(b"plain text, not a picture")}], "row 0: image: not a usable image"),
        ([{"audio": b64(b"not audio at all")}], "row 0: audio: not a usable audio file"),
        ([{"task": "caption", "text": "no picture"}], "row 0: caption: needs an image or audio"),
        ([{"task": "translate", "text": "hi"}], "row 0: task: unknown task 'translate'"),
    ],
)
def test_a_malformed_request_is_a_4xx_with_a_one_line_reason(server, records, reason):
    status, body = post(server["url"], {"dataframe_records": records})
    assert status == 400, body
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert error["reason"].startswith(reason) and "\n" not in error["reason"], error
    assert error["message"].endswith(error["reason"])  # the server prefixes the data it was given
    assert "Traceback" not in body and "stack_trace" not in error


def test_a_request_that_is_not_a_scoring_request_is_a_4xx(server):
    for body, content_type in ((b"{not json", "application/json"), ({"rows": []}, "application/json")):
        status, text = post(server["url"], body, content_type)
        assert 400 <= status < 500, text
    status, text = post(server["url"], b"text,image\nhi,", "text/plain")
    assert status == 415, text
