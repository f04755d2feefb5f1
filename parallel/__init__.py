"""Parallelism with no knowledge of the launcher: layouts and rank arithmetic, the cost and
memory models, the stage partitioner and the planner (pure Python: `plan` runs on a laptop),
and the torch building blocks (tensor-parallel layers, process groups, PowerSGD, collective
byte counting). Nothing here imports `launcher/`; what it needs from a config it reads
through the protocols of parallel/shapes.py.
"""
