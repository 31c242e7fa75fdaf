"""Ray Train side of mdt-ray: the worker loop, the trainer, checkpoint state."""
