"""Inference on a trained model, shared by the applications and the evaluate stage: loading a
model from a folder or MLflow (`resolve`), what it produces for a batch (`predict`), and the
content filter every generated text passes (`safety`)."""
