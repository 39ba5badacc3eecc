"""Evaluation without any discriminator: is the physics right, are the balls there, is it sharp,
how far is the distribution from the teacher's.

``tracking`` finds the prompt's balls in pixels; ``physics`` checks gravity, bounces and chunk
boundaries on those tracks; ``quality`` checks object count, colour and sharpness; ``frechet``
is a tiny FVD-style distance on a fixed random network; ``report`` combines them per system and
draws grids, curves and tables.
"""
