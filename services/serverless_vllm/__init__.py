"""Serverless vLLM: a control plane that serves many LLMs with vLLM on a fleet of GPU machines."""

__version__ = "0.1.0"
