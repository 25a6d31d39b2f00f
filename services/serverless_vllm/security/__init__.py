"""Access control and input hardening: credentials (auth), inference request checks (inference), what a
registration may run (models)."""
