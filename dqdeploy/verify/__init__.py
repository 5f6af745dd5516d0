"""Checks of what the stages made: ``check`` (graph against simulation), ``analyze`` (per-layer
sensitivity), ``inspect`` (what a folder holds) and the int8 kernel probes of this CPU.

Imports every layer below it.
"""
