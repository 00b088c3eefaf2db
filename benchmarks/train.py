"""End-to-end training benchmark: ``python -m benchmarks.train`` is ``chronicals bench``."""

from chronicals_fx.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
