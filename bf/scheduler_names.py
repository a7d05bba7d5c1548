"""The samplers bf supports, by name: one list for the CLI's choices, the diffusers samplers of
bf.models.diffusers_pipeline (training, eval, export) and the NumPy ones of bf.runtime.schedulers."""

SCHEDULERS = ("pndm", "ddim", "dpmpp2m", "euler")
NATIVE_HELP = "Default: the model's own (SD-v1.5: pndm, SDXL: euler)."

_CLASSES = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp2m", "EulerDiscreteScheduler": "euler"}


KNOWN_SCHEDULER_CLASSES = tuple(_CLASSES)


def native_scheduler(config: dict) -> str:
    """The sampler a model ships with (its scheduler_config.json's class), where bf has it; else PNDM."""
    return _CLASSES.get(str(config.get("_class_name")), "pndm")
