"""The server half of each stage: its runner (shared/stages.py names them)."""
