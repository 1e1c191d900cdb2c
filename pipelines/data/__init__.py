"""Data building blocks shared by the stages: sample records, the demo world, safe tar I/O."""
