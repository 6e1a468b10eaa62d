"""`python -m render render CAPTURE.h5 ...` and `python -m render info CAPTURE.h5`."""

from render.cli import main

if __name__ == "__main__":
    main()
