"""jobs: the `vaegen` command line. Thin: parse flags into configs, call cluster/, map errors to exit codes."""
