"""Ray Train side of mdt-ray: how a run launches (launch.py), its TorchTrainer (trainer.py), the
worker loop (loop.py), the worker's data position (position.py), the run directory (state.py)."""
