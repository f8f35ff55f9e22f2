"""Conversion of InfiMM checkpoints into Hub-ready folders of sharded safetensors."""
