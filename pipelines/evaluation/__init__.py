"""The evaluate stage's metrics, collection and plots."""
