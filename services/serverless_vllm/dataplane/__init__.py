"""What router and worker share on the request path: the pooled HTTP/1.1 client, the byte relay, the inference
routes, the one-write server protocol, the request body reader and the headers they exchange."""
