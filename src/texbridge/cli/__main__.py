"""`python -m texbridge.cli`: the same as the `texbridge` command."""

from . import main

if __name__ == "__main__":  # the demo's spawned children import this module too: they must not run the CLI
    main()
