"""Compressing a trained model (quantize, prune, measure) and registering it in MLflow as a pyfunc model."""
