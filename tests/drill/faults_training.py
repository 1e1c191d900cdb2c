"""Filled in by its drill: see tests/drill/case.py."""

DRILLS = []
