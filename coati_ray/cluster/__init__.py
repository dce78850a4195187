"""Ray plumbing: starting/joining a cluster, worker groups, (later) placement and weight sync."""
