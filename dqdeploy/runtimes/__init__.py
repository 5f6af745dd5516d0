"""Runtimes that execute exported UNets as drop-in replacements for diffusers UNets."""
