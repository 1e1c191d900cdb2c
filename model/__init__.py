"""crossmodal.model: the image + text + audio model library, in plain PyTorch.

It imports no ray, mlflow, deepspeed, `pipelines` or `jobs` (a test enforces it), so it can be
used on its own: in a notebook, under torchrun, or on a GPU box without the pipeline.
"""
