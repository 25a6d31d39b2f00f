"""The manager: registry of workers and models, routing table, placement and lifecycle decisions."""
