"""``python -m probe.studies.intervention run|analyse E``: the same as ``probe study intervention run|analyse E``.

The study is a package so that running it with ``-m`` does not import it twice (once with :mod:`probe.studies`,
which registers it, once as ``__main__``)."""

from probe.studies.intervention import main

raise SystemExit(main())
