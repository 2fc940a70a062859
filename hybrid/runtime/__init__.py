"""The runtime layer: the one builder (build.py) that assembles checkpoint -> model -> expert
executors -> placement -> online policy, and what it needs to count and check first
(memory.py), split the cores (threads.py) and attach placements (placement.py). hybrid.load
(hybrid/api.py) calls build.build_model.
"""
