"""Serving: an OpenAI-compatible HTTP server in front of any model, variant and engine the runner
can load (`vlm-bench serve`), and the client that runs a workload against such a server
(`vlm-bench run --endpoint`)."""
