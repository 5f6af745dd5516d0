"""The vocabulary every layer shares: errors, words (targets, layouts, formats), the inputs of a denoiser
call, one spec per diffusers denoiser family, the recipe, argument checks and the sampling loop.

Imports nothing from the rest of the package.
"""
