"""textdiff: train text-writing image diffusion models (data -> models -> diffusion -> train -> sampling -> eval)."""

__version__ = "0.1.0"
