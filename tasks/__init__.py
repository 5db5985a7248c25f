"""The pipeline's stages: tasks/<stage>.py, one per DVC stage, and the role packages they share (DESIGN.md)."""
