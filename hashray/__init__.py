"""hashray's front door: the ``hashray`` command and the demo.

The only package that imports both ``pipelines`` and ``serve``.
"""
