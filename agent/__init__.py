"""accelguard: makes shared AI accelerator nodes safe to hand from one tenant to the next."""

__version__ = "0.1.0"
