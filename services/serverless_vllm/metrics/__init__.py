"""Prometheus metrics of the router, the manager and the worker, and Prometheus service discovery.

Each app owns its own CollectorRegistry (never the global one), so `svllm up`, which runs the three apps in
one process, exports three independent sets. Gauges are read from the objects that own the state at scrape
time (custom collectors); counters and histograms are updated at a few hook points.
"""
