"""The applications on a trained model: index, search, caption, answer (F16), behind the
content filter (F17). `pipelines.apps.api` is the Python API; the CLI calls it."""
