"""Worker classes: plain Python; `coati_ray.cluster.group` makes them Ray actors."""
