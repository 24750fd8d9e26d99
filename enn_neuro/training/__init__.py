"""Training and evaluation: bp and local steps, the loop, checkpoints, metrics, studies."""
