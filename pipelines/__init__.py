"""crossmodal pipelines: the DAG, its stages, configs and the CLI.

Importing the package applies the project's environment defaults (see `pipelines.env`), so a
library user gets the same behaviour as the CLI.
"""

from pipelines.env import configure as _configure_env

_configure_env()
