"""``python -m otlinop``: the main job (see README)."""

from ._demo import main

if __name__ == "__main__":
    raise SystemExit(main())
