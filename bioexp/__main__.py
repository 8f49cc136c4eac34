"""`python -m bioexp` is the same as the `bioexp` command."""

from bioexp.cli import main

if __name__ == "__main__":
    main()
