"""``python -m filterd`` is the same as the ``filterd`` console script."""

from filterd.cli import main

if __name__ == "__main__":
    main()
