"""``python -m sharpgen`` runs the command line (``sharpgen --help``)."""

import sys

if __name__ == "__main__":
    try:
        from sharpgen.cli import main
    except KeyboardInterrupt:  # Ctrl-C while torch is still importing
        print("sharpgen: interrupted before starting; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(main())
