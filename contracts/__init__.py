"""The data contracts between hashray's stages, below both ``pipelines/`` and ``serve/``.

A stage reads its inputs as objects that are opened once per command and
passed down (:class:`contracts.dataset.DatasetDir`, :class:`contracts.codes.CodesDir`,
:class:`contracts.run.RunDir`), never re-read from their URI by every helper
on the way. Every path may be local or a ``pyarrow.fs`` URI (:mod:`contracts.fs`).
This package imports only :mod:`models` of the project's own code.
"""
