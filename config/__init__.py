"""Configuration: Settings from SANDBOX_* variables, and the composition root."""
from config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
