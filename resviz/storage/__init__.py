"""What lives on disk: checkpoints (safetensors + JSON) and run directories."""
