"""`vllm serve <model> --task image`: everything that plugs this package into vLLM (its modules
are listed in docs/architecture.md). A new flag is a field of `cli_args.ImageTaskArgs`."""
