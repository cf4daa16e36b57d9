"""``python -m sharpgen`` runs the command line (``sharpgen --help``)."""

from sharpgen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
