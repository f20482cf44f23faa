"""`python -m vramancer` is the same as the `vramancer` command."""

from vramancer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
