"""Test double (see tests/sleep_engine/vllm/entrypoints/openai/api_server.py): not vLLM."""
