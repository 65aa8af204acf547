"""Subcommands of `maskbank`; see flows/cli.py for the contract each module follows."""
