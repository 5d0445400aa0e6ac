"""vgpu: GPU sharing for container platforms, shaped like cgroups."""

__version__ = "0.1.0"
