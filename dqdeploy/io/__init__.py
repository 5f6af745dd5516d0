"""Files on disk: atomic writes and output rules, model folders, safetensors reading, the quantized
artifact and its storage format, validation and integrity seals, the resumable checkpoint.

Imports ``core``, ``system`` and ``quant`` (the module types an artifact stores).
"""
