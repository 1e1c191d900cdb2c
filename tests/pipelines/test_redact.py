"""Secrets in URIs and in the environment are masked before anything reaches MLflow or a log."""

from __future__ import annotations

from pipelines.redact import MASK, redact, redact_bytes, redact_tree

SECRET = "s3cr3t-Xq81"


def test_passwords_in_uris_are_masked_and_the_rest_kept():
    assert redact(f"http://user:{SECRET}@mlflow.example:5000/x") == f"http://user:{MASK}@mlflow.example:5000/x"
    assert redact(f"s3://AKIAKEY:{SECRET}@bucket/data") == f"s3://AKIAKEY:{MASK}@bucket/data"
    assert redact(f"s3://bucket/root?region=eu&secret_key={SECRET}") == f"s3://bucket/root?region=eu&secret_key={MASK}"
    assert redact(f"https://h/x?X-Amz-Signature={SECRET}&a=1") == f"https://h/x?X-Amz-Signature={MASK}&a=1"
    assert redact(f"gs://b/p?token={SECRET}") == f"gs://b/p?token={MASK}"
    # no credentials: nothing changes (ports, paths, plain queries)
    for text in ("http://127.0.0.1:5000/api", "sqlite:////tmp/runs/mlflow.db", "s3://b/p?region=eu", "file:///a/b"):
        assert redact(text) == text


def test_values_of_secret_env_vars_are_masked_wherever_they_appear():
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "HF_TOKEN": "hf_abcdef", "PATH": "/usr/bin", "OMP_NUM_THREADS": "1"}
    assert redact(f"error: cannot log in with {SECRET} / hf_abcdef on /usr/bin", env) == (
        f"error: cannot log in with {MASK} / {MASK} on /usr/bin"
    )


def test_names_are_read_by_whole_words():
    # PWD and OLDPWD hold the working directory: masking it broke every file:// URI under it.
    env = {"PWD": "/work/project", "OLDPWD": "/work/other", "DB_PASSWD": "hunter22", "KEYBOARD_LAYOUT": "dvorak"}
    assert (
        redact("file:///work/project/runs with hunter22, dvorak", env)
        == f"file:///work/project/runs with {MASK}, dvorak"
    )


def test_trees_and_files(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    tree = {"uri": f"http://u:{SECRET}@h/", "rows": [SECRET, 3], SECRET: 1.5}
    assert redact_tree(tree) == {"uri": f"http://u:{MASK}@h/", "rows": [MASK, 3], MASK: 1.5}
    assert redact_bytes(f'{{"source": "{SECRET}"}}'.encode()) == f'{{"source": "{MASK}"}}'.encode()
    binary = b"\x89PNG\xff\xfe" + SECRET.encode()
    assert redact_bytes(binary) == binary  # images and weights are not text: left as they are
