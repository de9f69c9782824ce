"""vfm-kt: task-oriented knowledge transfer from vision foundation models."""

__version__ = "0.1.0"
