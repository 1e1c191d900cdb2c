"""Thin entry points that run the pipeline somewhere else: Ray job submission."""
