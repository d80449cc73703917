"""Sandbox runtimes: one Runtime protocol (base.py), one module per backend."""
