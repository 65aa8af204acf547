"""Orchestration: Prefect flows on Dask (`flows.prepare.prepare_bank`), the `maskbank` CLI
(`flows.cli`, one module per command in `flows.commands`) and deployment helpers
(`flows.serve`, `flows.server`). Heavy imports stay inside functions so the CLI starts fast."""
