"""Training: what a launch starts (launch.py: `auto` resolved and checked for the world and
device; preflight.py: every check before a process group exists; launch_env.py: who am I),
the run's set-up (setup.py), the engine (engine.py: model + optimizer + DeepSpeed), and the
step loop (loop.py), the shortest path from YAML to the optimizer step.
"""
