"""``shapes``: a procedural text-to-image data set where prompt faithfulness is measurable.

Scenes of one or two flat objects on a plain background, captions from templates, a
renderer, an object detector, and a judge that checks a detection against a prompt.
NumPy and Pillow only.
"""
