"""The reliability drill (`make drill`): bad inputs, bad configs, faults, security, logs.

Every drill runs against the real Ray, DeepSpeed and MLflow on the `tiny` size and returns
rows of one table (case, what was done, expected, outcome, samples in / out / quarantined,
pass or fail). `python -m tests.drill` runs them all and prints the table; pytest runs the
quick ones (marker `drill`), the slow fault drills run in `make drill` only.
"""
