"""Task-level evaluation: does the policy solve the demo task, not only does a loss fall."""
