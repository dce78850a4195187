"""Test and benchmark infrastructure (e.g. `simulated_cluster`: a multi-node Ray cluster on one
machine). Used by tests/ and scripts/, never by the pipelines, workers or launchers."""
