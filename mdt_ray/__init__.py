"""mdt-ray: MDT-dist few-step distillation of TRELLIS flow transformers on Ray."""

__version__ = "0.1.0"
