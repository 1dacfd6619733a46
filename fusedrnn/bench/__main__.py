"""``python -m fusedrnn.bench``: run the benchmark suite (see ``--help``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
