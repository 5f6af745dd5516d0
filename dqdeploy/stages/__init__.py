"""The quantize stage (load, calibrate, fall back, distill, save) and what later stages share: opening any
model path (diffusers folder, artifact, export) as a denoiser, and seeded generation.

Imports every layer below it (``core`` .. ``exporters``).
"""
