"""Helpers shared by tests and benchmarks: start a server in a subprocess (`vllm serve` or any
command that listens on a port), wait until its `/health` answers, and stop it as Ctrl-C would.
Not part of the installed package; both `tests/` and `benchmarks/` import it from the
repository root."""
