"""Helpers shared by tests and benchmarks: start a server in a subprocess (`vllm serve` or any
command that listens on a port), wait until its `/health` answers, and stop it as Ctrl-C would
(`server_process.py`); fuzz a server from its OpenAPI schema (`fuzzing.py`); keep one loaded
pipeline runner open across batching engines (`shared_runner.py`). Not part of the installed
package; both `tests/` and `benchmarks/` import it from the
repository root."""
