"""The training loop and what it needs: DeepSpeed set-up, evaluation, Ray Train and standalone entry points.

The loop itself (`loop.py`) knows nothing of Ray: under Ray Train it gets its data from
`get_dataset_shard` and reports checkpoints through `ray.train.report` (`ray_worker.py`);
under torchrun / the deepspeed launcher it reads the prepared shards itself (`standalone.py`).
"""
