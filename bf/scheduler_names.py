"""The samplers bf supports, by name: one list for the CLI's choices, the diffusers samplers of
bf.models.diffusers_pipeline (training, eval, export) and the NumPy ones of bf.runtime.schedulers."""

SCHEDULERS = ("pndm", "ddim", "dpmpp2m", "euler")
