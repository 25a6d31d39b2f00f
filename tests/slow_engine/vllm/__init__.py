"""Fault-injection stand-in (see tests/slow_engine/vllm/entrypoints/openai/api_server.py): not vLLM."""
