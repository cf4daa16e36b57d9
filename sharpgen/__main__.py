"""``python -m sharpgen`` runs the command line (``sharpgen --help``)."""

from sharpgen.cli import main  # a Ctrl-C while PyTorch imports: see sharpgen._startup

if __name__ == "__main__":
    raise SystemExit(main())
