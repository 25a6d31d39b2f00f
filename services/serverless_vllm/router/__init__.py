"""The router: the OpenAI-compatible API, forwarding each request to a worker that serves the model."""
