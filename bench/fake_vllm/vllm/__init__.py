"""A stand-in for vLLM used by bench/hot_path.py --fake-engine (see api_server.py)."""
