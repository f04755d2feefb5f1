"""Planning a run before it starts: the Plan (layout, stage split, dtype) a config means for
a world size and device, `auto` resolved with the planner, the cluster planned for, the
dtype the device allows, and the `plan` command's report. Importable without torch (the
device probes in cluster.py and precision.py load it when called), so `plan` and
`--dry-run` run on a laptop.
"""
