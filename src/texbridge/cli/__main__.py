"""`python -m texbridge.cli`: the same as the `texbridge` command."""

from . import main

if __name__ == "__main__":
    main()
