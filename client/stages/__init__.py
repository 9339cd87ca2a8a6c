"""The site half of each stage: one handler per query action (shared/stages.py names them)."""
