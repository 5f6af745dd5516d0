"""The machine and its processes: CPU features and int8 exactness rules, TensorRT's presence, signals,
the torchrun launcher and collectives, progress and memory logging.

Imports only ``core``.
"""
