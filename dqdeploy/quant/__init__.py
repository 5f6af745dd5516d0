"""Quantization: math (primitives), quantizers, quantized layers, Weight Dilation, calibration, BKD."""
